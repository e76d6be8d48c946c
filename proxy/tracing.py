"""Optional OpenTelemetry traces: one span per request, when ``opentelemetry-api`` is installed.

``tracing_sink()`` returns ``None`` when the library is absent, so nothing else in the
proxy depends on it. The span (``chat.completions``, kind SERVER) is recorded after the
fact from the accounted request, with the request's own start and end times; attributes
follow OpenTelemetry's GenAI conventions (``gen_ai.*``) plus ``openrouter_proxy.*``. As
always with OpenTelemetry, spans go nowhere until the operator configures an SDK and an
exporter (e.g. ``opentelemetry-instrument`` with ``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

from __future__ import annotations

import importlib
from typing import Any

from proxy.accounting import LedgerEntry

__all__ = ["SpanSink", "tracing_sink"]


class SpanSink:
    """An ``EntrySink`` turning each accounted request into one finished span."""

    def __init__(self, trace: Any) -> None:
        self._tracer = trace.get_tracer("openrouter-proxy")
        self._kind = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)

    def emit_entry(self, entry: LedgerEntry) -> None:
        rec = entry.record
        usage = rec.usage
        attributes: dict[str, Any] = {
            "gen_ai.system": "openrouter",
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": rec.requested_model or "",
            "gen_ai.response.model": rec.model or "",
            "gen_ai.response.id": rec.generation_id or "",
            "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else 0,
            "gen_ai.usage.output_tokens": usage.completion_tokens if usage else 0,
            "http.response.status_code": rec.status,
            "openrouter_proxy.request_id": rec.request_id,
            "openrouter_proxy.key": rec.key_name or "",
            "openrouter_proxy.model": rec.routed_model or "",
            "openrouter_proxy.rule": rec.rule or "",
            "openrouter_proxy.cost_usd": float(entry.cost_usd),
            "openrouter_proxy.cost_source": entry.cost_source,
        }
        if rec.error_code:
            attributes["error.type"] = rec.error_code
        start_ns = int(rec.ts * 1e9)
        span = self._tracer.start_span("chat.completions", kind=self._kind, start_time=start_ns, attributes=attributes)
        if rec.status >= 500 or rec.error_code:
            span.set_status(self._error)
        span.end(end_time=start_ns + int(rec.latency_s * 1e9))


def tracing_sink() -> SpanSink | None:
    """A ``SpanSink`` if ``opentelemetry`` is importable, else ``None``."""
    try:
        trace = importlib.import_module("opentelemetry.trace")
    except ImportError:
        return None
    return SpanSink(trace)
