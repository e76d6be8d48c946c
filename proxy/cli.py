"""The ``openrouter-proxy`` command: ``serve``, ``emulate``, ``check``, ``usage``, ``keys``.

Exit codes: 0 success, 1 problems found (``check``), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.auth import hash_key, new_key
from proxy.config import DEFAULT_BASE_URL, Settings, load_settings
from proxy.yamlsrc import ConfigError

__all__ = ["main"]

ENV_CONFIG = "PROXY_CONFIG"


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get(ENV_CONFIG) or "config.yaml").resolve()


def _load(path: Path) -> Settings:
    try:
        return load_settings(path, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.app import ENV_DEV_KEY, ENV_UPSTREAM
    from proxy.routing import load_router

    path = _config_path(args.config)
    settings = _load(path)
    try:
        load_router(settings.policies_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    upstream = args.upstream
    if upstream == "openrouter" and settings.upstream.api_key is None:
        if settings.upstream.base_url == DEFAULT_BASE_URL:
            print(
                "OPENROUTER_API_KEY is not set. Export your OpenRouter key, or run offline against "
                "the built-in emulator: openrouter-proxy serve --upstream emulator",
                file=sys.stderr,
            )
            return 2
        print(f"warning: no OPENROUTER_API_KEY; calling {settings.upstream.base_url} without a key", file=sys.stderr)
    env = os.environ
    env[ENV_CONFIG] = str(path)
    env[ENV_UPSTREAM] = upstream
    env.pop(ENV_DEV_KEY, None)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    if not settings.keys:
        key = new_key()
        env[ENV_DEV_KEY] = hash_key(key)
        print(
            "\n  No virtual keys are configured, so this run has a one-time development key:\n\n"
            f"      {key}\n\n"
            f"  export OPENAI_BASE_URL=http://{host}:{port}/v1 OPENAI_API_KEY={key}\n"
            "  (it is valid until the proxy stops; add keys with `openrouter-proxy keys new`)\n",
            flush=True,
        )
    uvicorn.run(
        "proxy.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=args.workers or settings.server.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.server.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.emulator import create_app

    fixtures = Path(args.fixtures) if args.fixtures else None
    app = create_app(fixtures_dir=fixtures, api_key=args.api_key)
    print(f"OpenRouter emulator: OPENROUTER_BASE_URL=http://{args.host}:{args.port}/api/v1", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.routing import load_router

    path = _config_path(args.config)
    problems = []
    try:
        settings = load_settings(path, os.environ)
    except ConfigError as exc:
        problems.extend(exc.problems)
        settings = None
    router = None
    if settings is not None:
        try:
            router = load_router(settings.policies_dir)
        except ConfigError as exc:
            problems.extend(exc.problems)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found.")
        return 1
    assert settings is not None and router is not None
    print(f"{path}: ok ({len(settings.keys)} virtual keys, upstream {settings.upstream.base_url})")
    print(f"{settings.policies_dir}: ok ({len(router.aliases)} model aliases)")
    if settings.upstream.api_key is None:
        print("note: OPENROUTER_API_KEY is not set (fine with --upstream emulator)")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from proxy.report import GROUPS, build_report, parse_since, read_lines, render

    if args.log:
        log_path = Path(args.log)
    else:
        settings = _load(_config_path(args.config))
        if settings.usage.log_path is None:
            print("usage.log_path is not set in the config: no usage log is kept.", file=sys.stderr)
            return 2
        log_path = settings.usage.log_path
    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    unknown = [b for b in by if b not in GROUPS]
    if unknown or not by:
        print(f"--by takes a comma list of: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not log_path.exists():
        print(f"no usage log at {log_path} yet", file=sys.stderr)
        return 0
    report = build_report(read_lines(log_path), by, since)
    sys.stdout.write(render(report, args.format))
    if report.skipped:
        print(f"({report.skipped} unreadable line(s) skipped)", file=sys.stderr)
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = new_key()
    print(f"New virtual key for {args.name!r} (shown once; only its hash goes into config.yaml):\n")
    print(f"    {key}\n")
    print("Add to config.yaml under keys:\n")
    print(f"  - name: {args.name}")
    if args.team:
        print(f"    team: {args.team}")
    print(f"    sha256: {hash_key(key)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openrouter-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (default: $PROXY_CONFIG or config.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument(
        "--upstream",
        choices=("openrouter", "emulator"),
        default="openrouter",
        help="'emulator' runs the built-in OpenRouter emulator in-process (no key, no network)",
    )
    serve.set_defaults(func=cmd_serve)

    emulate = sub.add_parser("emulate", help="run the OpenRouter emulator")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=9090)
    emulate.add_argument("--fixtures", help="folder of fixture files that requests may replay")
    emulate.add_argument("--api-key", help="accept only this bearer key (default: any)")
    emulate.set_defaults(func=cmd_emulate)

    check = sub.add_parser("check", help="validate config and policies")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check)

    usage = sub.add_parser("usage", help="usage totals from the usage log")
    usage.add_argument("--config")
    usage.add_argument("--log", help="usage log path (default: usage.log_path from the config)")
    usage.add_argument(
        "--by",
        default="key,model",
        help="comma list: key,team,model,requested_model,rule,provider,status,day (default key,model)",
    )
    usage.add_argument("--since", help="e.g. 30m, 12h, 7d, 2026-11-01")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.set_defaults(func=cmd_usage)

    keys = sub.add_parser("keys", help="virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_new = keys_sub.add_parser("new", help="generate a key and print its config entry")
    keys_new.add_argument("--name", required=True)
    keys_new.add_argument("--team")
    keys_new.set_defaults(func=cmd_keys_new)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
