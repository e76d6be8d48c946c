"""The benchmark's results as markdown: tables, and the issue's targets checked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from streamprobe import ProbeSummary

EMULATOR = "emulator"
FLOOR = "floor (aiohttp)"
STARLETTE_FLOOR = "floor (starlette + aiohttp)"
PROXY = "proxy (all features)"


@dataclass(frozen=True, slots=True)
class Cell:
    """One measured wrk run. CPU figures are µs per completed request."""

    target: str
    mode: str
    connections: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float | None
    emulator_cpu_us: float
    redis_cpu_us: float
    errors: int
    rejected: int
    rss_mb: float | None
    foreign_pct: float


@dataclass(frozen=True, slots=True)
class ProbeRow:
    target: str
    ttft: ProbeSummary
    paced: ProbeSummary


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    start_requests: int
    start_rss_mb: float
    end_requests: int
    end_rss_mb: float
    samples: Sequence[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class ScalingRow:
    """One ``--workers`` run: req/s and, in cores (CPU seconds per second), what the proxy
    tree used, each of its busy processes, and the whole machine (out of ``cpus``)."""

    workers: int
    mode: str
    rps: float
    cpu_us: float
    p50_us: float
    errors: int
    proxy_cores: float
    process_cores: tuple[float, ...]
    machine_busy: float
    cpus: int

    @property
    def saturated(self) -> bool:
        """The machine had no CPU left (at least 90% of all CPUs busy)."""
        return self.machine_busy >= 0.9 * self.cpus


def scaling_line(row: ScalingRow) -> str:
    shares = " + ".join(f"{c:.2f}" for c in row.process_cores)
    return (
        f"{row.rps:,.0f} req/s, {row.cpu_us:.0f} µs/req, proxy {row.proxy_cores:.2f} cores ({shares}), "
        f"machine {row.machine_busy:.2f} of {row.cpus} CPUs busy"
    )


@dataclass(frozen=True, slots=True)
class Meta:
    args: Mapping[str, object]
    elapsed_s: float
    machine: str
    notes: Sequence[str] = ()


def progress(cell: Cell) -> str:
    cpu = f"{cell.cpu_us:6.0f}" if cell.cpu_us is not None else "     -"
    return (
        f"  {cell.target:<22} {cell.mode:<10} c={cell.connections:<3} {cell.rps:8.0f} req/s  "
        f"p50 {cell.p50_us / 1000:6.2f} ms  p99 {cell.p99_us / 1000:7.2f} ms  cpu {cpu} µs/req  "
        f"errors {cell.errors} (429: {cell.rejected})  foreign {cell.foreign_pct:3.0f}%"
    )


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def main_table(cells: Sequence[Cell]) -> str:
    direct = {(c.mode, c.connections): c for c in cells if c.target == EMULATOR}
    floor = {(c.mode, c.connections): c for c in cells if c.target == FLOOR}
    starlette = {(c.mode, c.connections): c for c in cells if c.target == STARLETTE_FLOOR}

    def ratio(cell: Cell, base: Cell | None) -> str:
        if base is None or not base.cpu_us or cell.cpu_us is None or cell.target == base.target:
            return "-"
        return f"{cell.cpu_us / base.cpu_us:.2f}x"

    lines = [
        "| target | mode | conns | req/s | p50 ms | p99 ms | added p50 ms | CPU µs/req | vs floor | vs starlette floor "
        "| emulator µs/req | redis µs/req | errors | of which 429 | RSS MB | foreign CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in sorted(cells, key=lambda c: (c.mode, c.connections)):
        at = (cell.mode, cell.connections)
        base = direct.get(at)
        added = (cell.p50_us - base.p50_us) / 1000 if base and cell.target != EMULATOR else None
        lines.append(
            f"| {cell.target} | {cell.mode} | {cell.connections} | {cell.rps:,.0f} | {cell.p50_us / 1000:.2f} | "
            f"{cell.p99_us / 1000:.2f} | {_fmt(added, '+.2f')} | {_fmt(cell.cpu_us)} | "
            f"{ratio(cell, floor.get(at))} | {ratio(cell, starlette.get(at))} | "
            f"{cell.emulator_cpu_us:.0f} | {cell.redis_cpu_us:.0f} | "
            f"{cell.errors} | {cell.rejected} | {_fmt(cell.rss_mb, '.1f')} | {cell.foreign_pct:.0f} |"
        )
    return "\n".join(lines)


def probe_table(rows: Sequence[ProbeRow]) -> str:
    base = next((r for r in rows if r.target == EMULATOR), None)
    lines = [
        "| target | streams | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | whole stream p50 ms "
        "| paced events | held back | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        t, p = row.ttft, row.paced
        added = t.ttft_p50_ms - base.ttft.ttft_p50_ms if base and row is not base else None
        lines.append(
            f"| {row.target} | {t.samples} | {_fmt(t.ttft_p50_ms, '.2f')} | {_fmt(t.ttft_p99_ms, '.2f')} | "
            f"{_fmt(added, '+.2f')} | {_fmt(t.total_p50_ms, '.2f')} | {p.events} | {p.held_back} | "
            f"{t.errors + p.errors} |"
        )
    return "\n".join(lines)


def scaling_table(rows: Sequence[ScalingRow]) -> str:
    one = {r.mode: r.rps for r in rows if r.workers == 1}
    lines = [
        "| workers | mode | conns | req/s | scaling | CPU µs/req | p50 ms | proxy cores (per process) "
        "| machine busy | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        scale = r.rps / one[r.mode] if one.get(r.mode) else float("nan")
        shares = " + ".join(f"{c:.2f}" for c in r.process_cores)
        lines.append(
            f"| {r.workers} | {r.mode} | 64 | {r.rps:,.0f} | {scale:.2f}x | {r.cpu_us:.0f} | "
            f"{r.p50_us / 1000:.2f} | {r.proxy_cores:.2f} ({shares}) | {r.machine_busy:.2f} of {r.cpus} | {r.errors} |"
        )
    return "\n".join(lines)


def scaling_verdict(one: ScalingRow, two: ScalingRow) -> str:
    """``yes`` when 2 workers give at least 1.8x; ``machine-bound`` when they gave more
    than 1 worker could and used more than one core, but the machine ran out of CPU
    (the figure then says what this machine allows, not what the proxy does); else no,
    flagged when the machine was saturated (then the run cannot tell either way)."""
    scale = two.rps / one.rps
    if scale >= 1.8:
        return "yes"
    if scale > 1.05 and two.proxy_cores > 1.1 and two.saturated:
        return "machine-bound"
    return "**no** (machine saturated: not measurable here)" if two.saturated else "**no**"


def targets(
    cells: Sequence[Cell], probes: Sequence[ProbeRow], memory: MemoryCheck | None, scaling: Sequence[ScalingRow]
) -> str:
    def cell(target: str, mode: str, conns: int) -> Cell | None:
        return next((c for c in cells if (c.target, c.mode, c.connections) == (target, mode, conns)), None)

    lines = ["| target | measured | met |", "|---|---|:---:|"]
    conns = sorted({c.connections for c in cells})
    references = (
        (STARLETTE_FLOOR, "the issue's reference, the starlette + aiohttp pass-through"),
        (FLOOR, "the raw ASGI + aiohttp floor (the proxy's own stack)"),
    )
    for reference, label in references:
        for mode in ("non-stream", "stream"):
            ratios = []
            for n in conns:
                proxy, floor = cell(PROXY, mode, n), cell(reference, mode, n)
                if proxy and floor and proxy.cpu_us and floor.cpu_us:
                    ratios.append((n, proxy.cpu_us / floor.cpu_us))
            if ratios:
                text = ", ".join(f"c={n}: {r:.2f}x" for n, r in ratios)
                met = _yes(max(r for _, r in ratios) <= 1.5)
                lines.append(f"| CPU/request ≤ 1.5x {label}, {mode} | {text} | {met} |")
    for mode in ("non-stream", "stream"):
        proxy, direct = cell(PROXY, mode, 1), cell(EMULATOR, mode, 1)
        if proxy and direct:
            added = (proxy.p50_us - direct.p50_us) / 1000
            lines.append(f"| p50 added latency < 1 ms at c=1, {mode} | {added:+.2f} ms | {_yes(added < 1.0)} |")
    proxy_probe = next((p for p in probes if p.target == PROXY), None)
    base_probe = next((p for p in probes if p.target == EMULATOR), None)
    if proxy_probe and base_probe:
        if proxy_probe.ttft.samples and base_probe.ttft.samples:
            added = proxy_probe.ttft.ttft_p50_ms - base_probe.ttft.ttft_p50_ms
            lines.append(f"| p50 added TTFT < 1 ms at c=1 | {added:+.2f} ms | {_yes(added < 1.0)} |")
        held = proxy_probe.paced.held_back - base_probe.paced.held_back
        lines.append(
            f"| streamed events never held back | {proxy_probe.paced.held_back} of {proxy_probe.paced.events} "
            f"paced events bunched (direct: {base_probe.paced.held_back}) | {_yes(held <= 0)} |"
        )
    if memory is not None:
        lines.append(
            f"| RSS < 100 MB after 100,000 requests | {memory.end_rss_mb:.1f} MB after {memory.end_requests:,} "
            f"requests ({memory.start_rss_mb:.1f} MB after {memory.start_requests:,}) | "
            f"{_yes(memory.end_rss_mb < 100) if memory.end_requests >= 100_000 else 'n/a (fewer requests)'} |"
        )
    for mode in ("non-stream", "stream"):
        pair = [r for r in scaling if r.mode == mode]
        if len(pair) == 2 and pair[0].rps:
            one, two = pair
            lines.append(
                f"| throughput scales with --workers, {mode} | 2 workers: {two.rps / one.rps:.2f}x req/s; proxy "
                f"{one.proxy_cores:.2f} → {two.proxy_cores:.2f} cores; machine {two.machine_busy:.2f} of "
                f"{two.cpus} CPUs busy | {scaling_verdict(one, two)} |"
            )
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(
    cells: Sequence[Cell],
    probes: Sequence[ProbeRow],
    memory: MemoryCheck | None,
    scaling: Sequence[ScalingRow],
    meta: Meta,
) -> str:
    args = meta.args
    parts = [
        f"# Benchmark, {'quick' if args.get('quick') else 'full'} run",
        "",
        f"{meta.machine}; {meta.elapsed_s:.0f} s in all. wrk -t1, {args['duration']:g} s per run after "
        f"{args['warmup']:g} s of warm-up; proxy and floor on CPUs `{args['proxy_cpus']}`, wrk, emulator and "
        f"Redis on `{args['load_cpus']}`. CPU µs/req: utime+stime of the target's process tree / requests. "
        "*Added* is over the emulator hit directly. Non-stream answers have 10 tokens, streamed ones 20 content "
        "events; prompts alternate 30 B / 2 KB; the proxy cycles through 8 virtual keys in 4 teams; "
        f"limits.admission: {args.get('admission', 'exact')}.",
        "",
        "## Throughput, latency, CPU",
        "",
        main_table(cells),
        "",
        "## Time to first token and event pacing (one connection, sequential)",
        "",
        "Paced streams: 10 events 10 ms apart; *held back* counts events that arrived < 2 ms after the previous one.",
        "",
        probe_table(probes),
        "",
    ]
    if memory is not None:
        parts += [
            "## Memory of the featured proxy",
            "",
            "| requests served | RSS MB |",
            "|---:|---:|",
            *(f"| {n:,} | {rss:.1f} |" for n, rss in memory.samples),
        ]
    if scaling:
        parts += [
            "",
            "## Workers (proxy not pinned; wrk, emulator and Redis still on their CPUs)",
            "",
            "The second worker can only use the CPU the load side leaves; *machine busy* near the CPU count means "
            "the machine, not the proxy, set the limit (showing 2x needs at least two CPUs more than this run had).",
            "",
            scaling_table(scaling),
        ]
    parts += ["", "## Targets (one worker, every feature on)", "", targets(cells, probes, memory, scaling)]
    if meta.notes:
        parts += ["", "## Notes", "", *(f"- {note}" for note in meta.notes)]
    parts.append("")
    return "\n".join(parts)
