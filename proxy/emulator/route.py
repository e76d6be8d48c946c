"""Pick the model that answers, walking ``model`` + ``models`` like OpenRouter's fallback.

For each candidate id, in order:

1. ``emulator/<fault>`` stands for ``DEFAULT_MODEL`` with ``<fault>``; other ids resolve in
   the catalog; unknown ids (and unknown ``emulator/`` faults) are skipped.
2. Its controls: ``Controls.for_model(id)`` (the ``faults`` entry of the id, if any).
3. A request that does not fit the model (estimated prompt tokens + ``max_tokens`` above the
   catalog's ``context_length``) gets OpenRouter's typed 400 ``context_length_exceeded``.
4. Its fault: the id's, else the controls' ``fault``; with a schedule, the attempt is counted
   under ``fault_key`` (default: the fault name, ``<id>:<fault>`` for ``faults`` entries) and
   the fault dropped when the schedule says so (``schedule.py``).
5. An error fault (or 3.) is this candidate's reply; the next candidate is tried.  Anything
   else answers: the model, with its non-error fault if any.

When no candidate answers, the last error is returned (400 invalid model if there was none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.emulator.catalog import Catalog, ResolvedModel
from proxy.emulator.controls import Controls
from proxy.emulator.faults import ErrorBook, ErrorReply, context_length_error
from proxy.emulator.request import ChatRequest
from proxy.emulator.schedule import FaultSchedule
from proxy.emulator.types import ERROR_FAULTS, FAULT_NAMES
from proxy.emulator.wire import JSON_HEADERS, error_body

__all__ = ["DEFAULT_MODEL", "FAULT_MODEL_PREFIX", "Route", "Router"]

DEFAULT_MODEL: Final = "openai/gpt-4o-mini"
"""Answers requests without ``model``/``models`` and backs ``emulator/<fault>`` ids."""
FAULT_MODEL_PREFIX: Final = "emulator/"


@dataclass(frozen=True, slots=True)
class Route:
    """Outcome of routing: an answering model, or the error to return."""

    model: ResolvedModel | None
    """The answering model; None when every candidate failed."""
    controls: Controls
    """Controls of the answering candidate (or of the last one tried)."""
    fault: str | None
    """Fault applied to that candidate."""
    error: ErrorReply | None
    """The reply when ``model`` is None."""


class Router:
    def __init__(self, catalog: Catalog, errors: ErrorBook, schedule: FaultSchedule) -> None:
        self._catalog = catalog
        self._errors = errors
        self._schedule = schedule

    def route(self, request: ChatRequest, controls: Controls, gid: str) -> Route:
        """Walk the candidates of ``request`` (see the module docstring)."""
        failed: Route | None = None
        for model_id in request.models:
            model, fault = self._resolve(model_id)
            if model is None:
                continue
            scoped = controls.for_model(model_id)
            context = model.info.context_length
            wanted = request.prompt_tokens + (request.max_tokens or 0)
            if wanted > context:
                body = context_length_error(context, request.prompt_tokens, request.max_tokens or 0)
                failed = Route(None, scoped, None, ErrorReply(400, JSON_HEADERS, body))
                continue
            fault = fault or scoped.fault
            if fault is not None and not self._schedule.applies(scoped.fault_key or fault, scoped):
                fault = None
            if fault in ERROR_FAULTS:
                failed = Route(None, scoped, fault, self._errors.reply(fault, gid, scoped.retry_after))
                continue
            return Route(model, scoped, fault, None)
        if failed is None:
            invalid = error_body(f"{request.models[0]} is not a valid model ID", 400)
            return Route(None, controls, None, ErrorReply(400, JSON_HEADERS, invalid))
        return failed

    def _resolve(self, model_id: str) -> tuple[ResolvedModel | None, str | None]:
        """(model, the fault its id names) — (None, None) for an unknown id."""
        if not model_id.startswith(FAULT_MODEL_PREFIX):
            return self._catalog.resolve(model_id), None
        fault = model_id.removeprefix(FAULT_MODEL_PREFIX)
        base = self._catalog.resolve(DEFAULT_MODEL)
        if fault not in FAULT_NAMES or base is None:
            return None, None
        return ResolvedModel(model_id, base.info, thinking=False), fault
