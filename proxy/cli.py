"""The ``openrouter-proxy`` command: ``serve``, ``emulate``, ``check``, ``usage``, ``export``, ``keys``.

Exit codes: 0 success, 1 problems found (``check``), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy.auth import hash_key, new_key
from proxy.config import DEFAULT_BASE_URL, Settings, load_settings
from proxy.keys_cli import add_key_commands
from proxy.limits import check_limits
from proxy.usage_cli import add_usage_commands
from proxy.yamlsrc import ConfigError, Problem

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
    from proxy.http_protocol import head_guard_protocol
    from proxy.routing import load_router

    path = _config_path(args.config)
    settings = _load(path)
    try:
        load_router(settings.policies_dir)
        if problems := check_limits(settings, str(path))[1]:
            raise ConfigError(problems)
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
    cannot_write = _open_outputs(settings, str(path))
    if cannot_write:
        for problem in cannot_write:
            print(problem, file=sys.stderr)
        return 2
    workers = settings.server.workers if args.workers is None else args.workers
    if workers > 1 and settings.store.redis_url is None and settings.admin.key_sha256 is not None:
        print(
            "The admin API (PROXY_ADMIN_KEY) needs REDIS_URL when serving with more than one worker: "
            "runtime keys live in the store, and without Redis each worker has a store of its own "
            "(a key created or revoked on one worker would not be on the others).",
            file=sys.stderr,
        )
        return 2
    env = os.environ
    env[ENV_CONFIG] = str(path)
    env[ENV_UPSTREAM] = upstream
    env.pop(ENV_DEV_KEY, None)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    if not settings.keys and settings.admin.key_sha256 is None:  # else keys come from the admin API
        key = new_key()
        env[ENV_DEV_KEY] = hash_key(key)
        print(
            "\n  No virtual keys are configured, so this run has a one-time development key:\n\n"
            f"      {key}\n\n"
            f"  export OPENAI_BASE_URL=http://{host}:{port}/v1 OPENAI_API_KEY={key}\n"
            "  (it is valid until the proxy stops; add keys with `openrouter-proxy keys new`)\n",
            flush=True,
        )
    options: dict[str, object] = {
        "app": "proxy.app:app_from_env",
        "factory": True,
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": head_guard_protocol(settings.server.header_timeout_s, settings.server.max_header_bytes),
        "lifespan": "on",
        "log_level": settings.server.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": math.ceil(settings.server.drain_timeout_s),
        "timeout_keep_alive": settings.server.keep_alive_timeout_s,
    }
    if workers > 1:
        from proxy.metrics import MULTIPROC_ENV, prepare_multiprocess_dir
        from proxy.workers import reuseport_supported, serve_workers

        made = MULTIPROC_ENV not in env
        metrics_dir = prepare_multiprocess_dir(env)
        try:
            if reuseport_supported():
                uvicorn.Config(**options)  # type: ignore[arg-type]  # sets up logging in this process
                return serve_workers(options, workers)
            uvicorn.run(workers=workers, **options)  # type: ignore[arg-type]
        finally:
            if made:  # the temporary one this run made (an operator's own directory stays)
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    uvicorn.run(workers=workers, **options)  # type: ignore[arg-type]
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
    from proxy.routing import load_router, routing_schema

    if args.schema:
        print(json.dumps(routing_schema(), indent=2))
        return 0
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
        limits, limit_problems = check_limits(settings, str(path))
        problems.extend(limit_problems)
        problems.extend(_unwritable(settings, str(path)))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found.")
        return 1
    assert settings is not None and router is not None
    print(f"{path}: ok ({len(settings.keys)} virtual keys, upstream {settings.upstream.base_url})")
    counts = f"{len(router.aliases)} model aliases, {len(router.policy.rules)} rules"
    print(f"{settings.policies_dir}: ok ({counts}, policy {router.policy_hash})")
    if limits is not None:
        print(f"{settings.policies_dir / settings.limits.policy_file}: ok ({len(limits.tiers)} limit tiers)")
    if settings.upstream.api_key is None:
        print("note: OPENROUTER_API_KEY is not set (fine with --upstream emulator)")
    return 0


def _outputs(settings: Settings) -> list[tuple[str, Path]]:
    """The files the proxy appends to: ``(setting, path)``."""
    targets = []
    if settings.usage.log_path is not None:
        targets.append(("usage.log_path", settings.usage.log_path))
    request_log = settings.logging.request_log
    if request_log not in (None, "stderr"):
        targets.append(("logging.request_log", Path(str(request_log))))
    return targets


def _unwritable(settings: Settings, source: str) -> list[Problem]:
    """For ``check`` (which creates nothing): the output files whose nearest existing
    folder this user may not write, or that are folders."""
    problems = []
    for name, target in _outputs(settings):
        existing = target if target.exists() else next(p for p in target.parents if p.exists())
        blocked = existing != target and not existing.is_dir()  # a file where a folder must be
        if blocked or target.is_dir() or not os.access(existing, os.W_OK):
            problems.append(Problem(source, None, f"{name}: {target} cannot be written"))
    return problems


def _open_outputs(settings: Settings, source: str) -> list[Problem]:
    """For ``serve``: create the output files (and their folders) now, as the workers would,
    so that one that cannot be written is a clear message instead of a failed startup."""
    problems = []
    for name, target in _outputs(settings):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))  # as the writers make it
        except OSError as exc:
            problems.append(Problem(source, None, f"{name}: {target} cannot be written ({exc.strerror or exc})"))
    return problems


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


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openrouter-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (default: $PROXY_CONFIG or config.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_int_in(0, 65535))
    serve.add_argument("--workers", type=_int_in(1, 64))
    serve.add_argument(
        "--upstream",
        choices=("openrouter", "emulator"),
        default="openrouter",
        help="'emulator' runs the built-in OpenRouter emulator in-process (no key, no network)",
    )
    serve.set_defaults(func=cmd_serve)

    emulate = sub.add_parser("emulate", help="run the OpenRouter emulator")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=_int_in(0, 65535), default=9090)
    emulate.add_argument("--fixtures", help="folder of fixture files that requests may replay")
    emulate.add_argument("--api-key", help="accept only this bearer key (default: any)")
    emulate.set_defaults(func=cmd_emulate)

    check = sub.add_parser("check", help="validate config and policies")
    check.add_argument("--config")
    check.add_argument("--schema", action="store_true", help="print the JSON Schema of routing.yaml and exit")
    check.set_defaults(func=cmd_check)

    add_usage_commands(sub, lambda config: _load(_config_path(config)))

    keys = sub.add_parser("keys", help="virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_new = keys_sub.add_parser("new", help="generate a key and print its config entry")
    keys_new.add_argument("--name", required=True)
    keys_new.add_argument("--team")
    keys_new.set_defaults(func=cmd_keys_new)
    add_key_commands(keys_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
