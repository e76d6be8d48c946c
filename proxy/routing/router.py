"""``Router``: the object the pipeline asks for a ``RoutePlan``, and loading it from YAML.

A ``Router`` holds one ``CompiledPolicy`` and may swap it for another at any moment
(``ReloadingRouter`` does, on file changes and SIGHUP). ``plan()`` reads the current
policy once, so a request is decided by one policy from start to end, and the
``RoutePlan`` it returns is immutable: in-flight requests finish on the plan they started
with. Counters and budgets live in the store, never here, so a swap resets nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from proxy.routing.checks import check_policy
from proxy.routing.engine import CompiledPolicy
from proxy.routing.schema import RoutingPolicy
from proxy.types import ChatCall, Principal, RoutePlan
from proxy.yamlsrc import ConfigError, Problem, Source, load_yaml, problems_from_validation

__all__ = ["ROUTING_FILE", "Router", "compile_policy", "load_policy", "load_router"]

ROUTING_FILE = "routing.yaml"


class Router:
    """Routing decisions from the current policy. ``Router(RoutingPolicy(...))`` compiles one.

    Raises ``ConfigError`` (without lines) when the policy has cross-rule problems; use
    ``load_router`` to get file and line.
    """

    def __init__(self, policy: RoutingPolicy | CompiledPolicy) -> None:
        self._current = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)

    @property
    def current(self) -> CompiledPolicy:
        """The compiled policy in force."""
        return self._current

    @property
    def policy(self) -> RoutingPolicy:
        return self._current.policy

    @property
    def policy_hash(self) -> str:
        """12 hex characters identifying the policy in force (``engine.policy_hash``)."""
        return self._current.policy_hash

    @property
    def aliases(self) -> dict[str, str]:
        """Alias -> final OpenRouter model id (chains resolved). Do not modify."""
        return self._current.aliases

    def plan(self, call: ChatCall, principal: Principal, headers: Sequence[tuple[bytes, bytes]] = ()) -> RoutePlan:
        """The ``RoutePlan`` for ``call`` (``engine.CompiledPolicy.plan``).

        ``headers``: the request's ASGI headers, for ``match.header`` conditions. Raises
        ``PermissionDenied`` when a deny rule matches.
        """
        return self._current.plan(call, principal, headers)

    def model_aliases(self) -> dict[str, str]:
        """Alias -> final OpenRouter model id (a copy)."""
        return dict(self._current.aliases)

    def swap(self, policy: CompiledPolicy) -> None:
        """Put ``policy`` in force for every later ``plan()`` call."""
        self._current = policy

    async def start(self) -> None:
        """Start background work (none for a static router)."""

    async def stop(self) -> None:
        """Stop background work (none for a static router)."""


def compile_policy(policy: RoutingPolicy, source: Source | None = None) -> CompiledPolicy:
    """Check ``policy`` across rules and compile it.

    Raises ``ConfigError`` listing every problem, with lines when ``source`` is given.
    """
    findings = check_policy(policy)
    if findings:
        file = source.file if source else "<routing policy>"
        raise ConfigError([Problem(file, source.line_of(loc) if source else None, msg) for loc, msg in findings])
    return CompiledPolicy(policy)


def load_policy(policies_dir: Path) -> CompiledPolicy:
    """Read, validate and compile ``policies_dir/routing.yaml`` (absent or empty: no routing).

    Raises ``ConfigError`` with each problem's file and line: YAML syntax, unknown keys,
    wrong types, invalid patterns and regular expressions, bad splits, rules that can
    never match, duplicate rule names, alias cycles.
    """
    path = policies_dir / ROUTING_FILE
    if not path.exists():
        return CompiledPolicy(RoutingPolicy())
    data, source = load_yaml(path)
    if data is None or data == {}:
        return CompiledPolicy(RoutingPolicy())
    if not isinstance(data, dict):
        raise ConfigError([Problem(source.file, 1, "the file must hold a mapping")])
    try:
        policy = RoutingPolicy.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation(exc, source)
        raise ConfigError([Problem(p.file, p.line, p.message.replace("Value error, ", "")) for p in problems]) from None
    return compile_policy(policy, source)


def load_router(policies_dir: Path) -> Router:
    """A static ``Router`` for ``policies_dir/routing.yaml``; raises as ``load_policy``."""
    return Router(load_policy(policies_dir))
