"""``openrouter-proxy keys list|show|create|update|revoke``: runtime keys via the admin API.

These commands talk to a running proxy (``--url``, default ``$PROXY_URL`` or
``http://127.0.0.1:8080``) with the admin key from ``$PROXY_ADMIN_KEY``, so they work the
same with the in-memory store (keys live in that process) and with Redis (every replica
sees the change within about a second). ``keys new`` (in ``proxy.cli``) stays offline: it
prints a config-file entry. Exit codes: 0 success, 1 the proxy refused, 2 bad usage or
the proxy unreachable.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import httpx
import orjson

__all__ = ["add_key_commands"]

ENV_URL = "PROXY_URL"
ENV_ADMIN_KEY = "PROXY_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
_BUDGETS = (("budget_day", "budget_usd_per_day"), ("budget_month", "budget_usd_per_month"))
_COLUMNS = ("name", "key_id", "team", "tier", "source")


class _Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


Command = Callable[[argparse.Namespace], int]


def _reporting(func: Command) -> Command:
    """Turn ``_Failed`` into its message on stderr and its exit code."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except _Failed as exc:
            print(exc, file=sys.stderr)
            return exc.code

    return run


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no request lines in the output
    admin_key = os.environ.get(ENV_ADMIN_KEY)
    if not admin_key:
        raise _Failed(2, f"{ENV_ADMIN_KEY} is not set: export the proxy's admin key.")
    url = (args.url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/") + path
    try:
        response = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {admin_key}"}, timeout=args.timeout
        )
    except httpx.HTTPError as exc:
        raise _Failed(2, f"cannot reach the proxy at {url}: {type(exc).__name__}") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise _Failed(1, f"error {response.status_code}: {error.get('message') or response.text}")
    return data


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_list(args: argparse.Namespace) -> int:
    data = _request(args, "GET", "/admin/keys")["data"]
    if args.json:
        _print_json(data)
        return 0
    rows = [[str(k.get(c) or "-") for c in _COLUMNS] for k in data]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    for row in [list(_COLUMNS), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _print_json(_request(args, "GET", f"/admin/keys/{args.name}"))
    return 0


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for attr, field in (("team", "team"), ("tier", "tier"), *_BUDGETS, ("budget_total", "budget_usd_total")):
        value = getattr(args, attr, None)
        if value is not None:
            body[field] = None if value in ("none", "") else (_usd(attr, value) if attr.startswith("budget") else value)
    return body


def _usd(option: str, text: str) -> float:
    """A budget option's value in USD; ``_Failed`` (exit 2) unless it is a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _Failed(2, f"--{option.replace('_', '-')} takes an amount in USD (or 'none'), not {text[:40]!r}")
    return value


def cmd_create(args: argparse.Namespace) -> int:
    created = _request(args, "POST", "/admin/keys", {"name": args.name, **_changes(args)})
    print(f"New virtual key {created['name']!r} (shown once; the proxy keeps only its hash):\n")
    print(f"    {created['key']}\n")
    print(f"key_id {created['key_id']}, team {created['team'] or '-'}, tier {created['effective_tier'] or '-'}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    body = _changes(args)
    if not body:
        print("nothing to change: give --team, --tier or a --budget-* option", file=sys.stderr)
        return 2
    _print_json(_request(args, "PATCH", f"/admin/keys/{args.name}", body))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    _request(args, "DELETE", f"/admin/keys/{args.name}")
    print(f"revoked {args.name!r} (every replica refuses it within about a second)")
    return 0


def add_key_commands(keys_sub: Any) -> None:
    """Add the admin-API subcommands to the ``keys`` subparsers."""

    def command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = keys_sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--url", help=f"the proxy (default ${ENV_URL} or {DEFAULT_URL}); admin key: ${ENV_ADMIN_KEY}"
        )
        parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds")
        parser.set_defaults(func=_reporting(func))
        return parser

    def changes(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--team")
        parser.add_argument("--tier", help="a tier of policies/limits.yaml")
        for flag in ("--budget-day", "--budget-month", "--budget-total"):
            parser.add_argument(flag, help="USD; 'none' clears (update)")

    listing = command("list", "list virtual keys (runtime and config)", cmd_list)
    listing.add_argument("--json", action="store_true")
    command("show", "one key with its limits and spend", cmd_show).add_argument("name")
    create = command("create", "create a runtime key (printed once)", cmd_create)
    create.add_argument("--name", required=True)
    changes(create)
    update = command("update", "change a runtime key's team, tier or budgets", cmd_update)
    update.add_argument("name")
    changes(update)
    command("revoke", "revoke a runtime key", cmd_revoke).add_argument("name")
