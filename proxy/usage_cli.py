"""``openrouter-proxy usage`` (reports) and ``openrouter-proxy export`` (ledger to files).

``usage`` reads, in this order of preference: ``--log PATH`` (a usage log), ``--dir DIR``
(exporter files), the store's per-day rollups when a shared store is configured
(``REDIS_URL`` / ``store.redis_url``), ``ledger.export_dir``, then ``usage.log_path``.
From rollups ``--by`` takes ``key, team, model, rule, day`` and ``--since`` defaults to
``7d`` (whole UTC days); from lines it also takes ``requested_model, provider, status``.

``export --out DIR`` drains the store's ledger stream into ``DIR`` (see
``proxy.exporter``), once (``--once``) or until SIGINT/SIGTERM. Exit codes: 0 success,
1 another exporter holds ``DIR`` or the store failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from proxy.config import Settings
from proxy.exporter import Exporter, ExportLocked
from proxy.report import AGGREGATE_GROUPS, GROUPS, Report, build, build_report, parse_since, render
from proxy.report_sources import export_files, facts_from_store, read_lines
from proxy.store import StoreUnavailable, day_of, open_store

__all__ = ["add_usage_commands"]

LoadSettings = Callable[[str | None], Settings]


def _report_from_store(redis_url: str, max_days: int, by: tuple[str, ...], since: float) -> Report:
    async def main() -> Report:
        store = open_store(redis_url)
        try:
            facts = await facts_from_store(store.usage, since, max_days=max_days)
        finally:
            await store.aclose()
        return build(facts, by, source=f"from the store's per-day rollups since {day_of(since)}")

    return asyncio.run(main())


def cmd_usage(args: argparse.Namespace, load: LoadSettings) -> int:
    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    paths: list[Path] | None = None
    store: tuple[str, int] | None = None  # Redis URL, days its rollups live (ledger.rollup_ttl_days)
    if args.log:
        paths = [Path(args.log)]
        if not paths[0].is_file():  # a mistyped path is not an empty log
            print(f"no usage log at {args.log}", file=sys.stderr)
            return 2
    elif args.dir:
        paths = export_files(Path(args.dir), since)
    else:
        settings = load(args.config)
        export_dir = settings.ledger.export_dir
        if settings.store.redis_url:
            store = (settings.store.redis_url, settings.ledger.rollup_ttl_days)
        elif export_dir is not None and export_dir.is_dir():
            paths = export_files(export_dir, since)
        elif settings.usage.log_path is not None:
            paths = [settings.usage.log_path]
        else:
            print("no usage source: set REDIS_URL, ledger.export_dir or usage.log_path", file=sys.stderr)
            return 2
    allowed = AGGREGATE_GROUPS if store else GROUPS
    if not by or any(b not in allowed for b in by):
        print(f"--by takes a comma list of: {', '.join(allowed)}", file=sys.stderr)
        return 2
    if store:
        try:
            report = _report_from_store(*store, by, parse_since("7d") if since is None else since)
        except StoreUnavailable as exc:
            print(f"the store is unavailable: {exc}", file=sys.stderr)
            return 1
    else:
        assert paths is not None
        existing = [p for p in paths if p.exists()]
        if not existing:
            print("no usage data yet", file=sys.stderr)
            return 0
        report = build_report(read_lines(existing), by, since)
    sys.stdout.write(render(report, args.format))
    if report.skipped:
        print(f"({report.skipped} unreadable line(s) skipped)", file=sys.stderr)
    return 0


async def _export(exporter: Exporter, once: bool, interval_s: float) -> int:
    if once:
        count = await exporter.drain()
        print(f"exported {count} entries to {exporter.out_dir} (up to {exporter.cursor})", file=sys.stderr)
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await exporter.run(interval_s, stop)
    return 0


def cmd_export(args: argparse.Namespace, load: LoadSettings) -> int:
    settings = load(args.config)
    if not settings.store.redis_url:
        print("export needs the shared store: set REDIS_URL (or store.redis_url)", file=sys.stderr)
        return 2

    async def main() -> int:
        store = open_store(settings.store.redis_url)
        exporter = Exporter(
            store.usage, Path(args.out), max_file_bytes=int(args.max_file_mb * 1024 * 1024), batch_size=args.batch
        )
        try:
            exporter.open()
            return await _export(exporter, args.once, args.interval)
        except ExportLocked as exc:
            print(exc, file=sys.stderr)
            return 1
        except StoreUnavailable as exc:
            print(f"the store is unavailable: {exc}", file=sys.stderr)
            return 1
        finally:
            exporter.close()
            with contextlib.suppress(Exception):
                await store.aclose()

    return asyncio.run(main())


def add_usage_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], load: LoadSettings) -> None:
    """Add ``usage`` and ``export``; ``load(config_arg)`` loads settings (exits 2 when invalid)."""
    usage = sub.add_parser("usage", help="usage report from the ledger, exported files or the usage log")
    usage.add_argument("--config")
    usage.add_argument("--log", help="read this usage log (JSON lines)")
    usage.add_argument("--dir", help="read the exporter's files in this folder")
    usage.add_argument("--by", default="key,model", help=f"comma list of: {', '.join(GROUPS)} (default key,model)")
    usage.add_argument("--since", help="e.g. 30m, 12h, 7d, 2026-11-01 (store default: 7d)")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.set_defaults(func=lambda args: cmd_usage(args, load))

    export = sub.add_parser("export", help="drain the ledger stream into JSON-lines files")
    export.add_argument("--config")
    export.add_argument("--out", required=True, help="folder for usage-YYYY-MM-DD[.N].jsonl files")
    export.add_argument("--once", action="store_true", help="export what is there, then exit")
    export.add_argument("--interval", type=float, default=5.0, help="seconds between passes (default 5)")
    export.add_argument("--batch", type=int, default=1000, help="entries per read and fsync (default 1000)")
    export.add_argument("--max-file-mb", type=float, default=64.0, help="rotate files at this size (default 64)")
    export.set_defaults(func=lambda args: cmd_export(args, load))
