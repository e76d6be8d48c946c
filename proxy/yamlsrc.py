"""YAML files read with the line of every value, so config problems name file and line.

``load_yaml(path)`` returns the data and a ``Source`` that maps a location (the tuple of
keys and list indexes that pydantic reports in ``ValidationError.errors()[i]["loc"]``) to
the 1-based line where that value, or its nearest parent, stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

__all__ = ["ConfigError", "Problem", "Source", "load_yaml", "problems_from_validation"]

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a config or policy file, with where it is."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config or policy file is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class Source:
    file: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its closest ancestor that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            line = key_node.start_mark.line + 1
            if key in out:  # YAML would keep the last silently: a second `rules:` drops the first
                dotted = ".".join(str(p) for p in (*loc, key))
                first = lines[(*loc, key)]
                raise ConfigError([Problem(file, line, f"{dotted}: duplicate key (first on line {first})")])
            lines[(*loc, key)] = line
            out[key] = _walk(value_node, (*loc, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), lines, file) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def load_yaml(path: Path) -> tuple[Any, Source]:
    """Parse ``path``; raise ``ConfigError`` (with the line) on a YAML syntax error, a key
    repeated in one mapping (plain YAML keeps the last one silently), or bytes that are not
    UTF-8.

    An empty file yields ``{}``. Keys are kept as strings where YAML gave scalars.
    """
    source = Source(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), None, f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        at = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(str(path), at, "the file is not UTF-8 text")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError([Problem(str(path), line, f"YAML syntax error: {exc.problem}")]) from None
    if node is None:
        return {}, source
    return _walk(node, (), source.lines, source.file), source


def problems_from_validation(exc: ValidationError, source: Source, prefix: Loc = ()) -> list[Problem]:
    """Turn pydantic's errors into ``Problem``s naming file, line and dotted location.

    A check across fields (a model validator: no location of its own) that starts its
    message with the dotted key it is about (``limits.lease_s must be ...``) is placed
    at that key's line."""
    problems = []
    for err in exc.errors():
        loc: Loc = (*prefix, *(p for p in err["loc"] if isinstance(p, str | int)))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        named = (*loc, *message.split(" ", 1)[0].split("."))
        if len(named) > len(loc) + 1 and named in source.lines:
            loc, message = named, message.split(" ", 1)[1] if " " in message else message
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        problems.append(Problem(source.file, source.line_of(loc), f"{dotted}: {message}"))
    return problems
