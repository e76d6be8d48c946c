"""Every error the proxy sends to a client, and the one function that renders it.

Each error knows its HTTP status and its OpenAI ``type``/``code``/``param``; the client
always receives OpenAI's envelope::

    {"error": {"message": str, "type": str, "param": str | null, "code": str | int | null}}

plus ``metadata`` (and ``availability``) when relaying an OpenRouter error, so nothing
OpenRouter said is lost. The hierarchy::

    ProxyError
    ├── InternalError ............. 500 server_error            (a bug; details only in the log)
    ├── InvalidRequest ............ 400 invalid_request_error   (bad JSON, missing/typed fields)
    │   └── ContextLengthExceeded . 400 context_length_exceeded (no routed model's window fits)
    ├── AuthenticationFailed ...... 401 invalid_request_error / invalid_api_key
    ├── PermissionDenied .......... 403 permission_error
    ├── NotFound .................. 404 invalid_request_error / not_found
    ├── MethodNotAllowed .......... 405 invalid_request_error / method_not_allowed
    ├── BodyTooLarge .............. 413 invalid_request_error / request_too_large
    ├── UpstreamStatusError ....... OpenRouter's own status, relayed (4xx/5xx)
    ├── UpstreamKeyRejected ....... 502 upstream_authentication_error (OpenRouter said 401)
    ├── UpstreamOutOfCredits ...... 503 upstream_insufficient_credits (OpenRouter said 402)
    ├── UpstreamUnreachable ....... 502 upstream_connection_error
    │   └── UpstreamCut ........... the body broke off after the response started
    ├── UpstreamTimeout ........... 504 upstream_timeout (connect, first byte, first token, total)
    ├── Unavailable ............... 503 starting_or_stopping
    ├── StoreDown ................. 503 store_unavailable (admin and report routes)
    ├── CircuitOpen ............... 503 upstream_unavailable / circuit_open
    ├── RequestTimeout ............ 408 request_timeout (slow request body)
    ├── RateLimited ............... 429 rate_limit_exceeded       (a gateway rate limit; Retry-After)
    │   └── QuotaExceeded ......... 429 insufficient_quota        (a USD budget; final for its period)
    ├── LimitsUnavailable ......... 503 limits_unavailable        (limits store down, fail_closed)
    ├── UsageUnavailable .......... 503 usage_unavailable         (usage reports: store down)
    └── UpstreamBusy .............. 503 upstream_busy             (upstream pacing queue full or too slow)

Errors that retrying cannot fix carry ``x-should-retry: false``, which the OpenAI SDKs
honour. Third-party exceptions are translated into these at their boundary (the upstream
module for HTTP client errors), never here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

__all__ = [
    "AuthenticationFailed",
    "BodyTooLarge",
    "CircuitOpen",
    "ContextLengthExceeded",
    "HeaderTooLarge",
    "InternalError",
    "InvalidRequest",
    "LimitsUnavailable",
    "MethodNotAllowed",
    "NotFound",
    "PermissionDenied",
    "ProxyError",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "StoreDown",
    "Unavailable",
    "UpstreamBusy",
    "UpstreamCut",
    "UpstreamKeyRejected",
    "UpstreamOutOfCredits",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "UsageUnavailable",
    "redact_strings",
    "render_error",
]


class ProxyError(Exception):
    """Base of every error sent to a client. Subclasses set the class attributes."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    should_retry: ClassVar[bool | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retries_spent = False

    def status_code(self) -> int:
        return self.status

    def error_object(self) -> dict[str, Any]:
        """The inner ``error`` object of the OpenAI envelope."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def retry_hint(self) -> bool | None:
        return self.should_retry


class InternalError(ProxyError):
    code = "internal_error"


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    should_retry = False


class ContextLengthExceeded(InvalidRequest):
    """Estimated prompt + max_tokens exceed the context window of every routed model."""

    code = "context_length_exceeded"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    should_retry = False


class PermissionDenied(ProxyError):
    status = 403
    type = "permission_error"
    code = "permission_denied"
    should_retry = False


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    should_retry = False


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    should_retry = False


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    should_retry = False


class HeaderTooLarge(ProxyError):
    """A request head (request line and headers) over ``server.max_header_bytes``."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"
    should_retry = False


# OpenRouter status -> OpenAI error type, for relayed errors (openrouter-api.md §4.2).
_RELAYED_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_NOT_RETRYABLE = frozenset({400, 403, 404, 413, 422})


def redact_strings(obj: dict[str, Any] | list[Any], redact: Callable[[str], str]) -> None:
    """Apply ``redact`` to every string value in ``obj``, in place (without recursion: an
    upstream error object may be nested deep)."""
    stack: list[Any] = [obj]
    while stack:
        node = stack.pop()
        for name, value in list(node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str):
                node[name] = redact(value)
            elif isinstance(value, dict | list):
                stack.append(value)


_RETRY_AFTER = re.compile(r"^(?:\d{1,9}(?:\.\d+)?|[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT)$")


class UpstreamStatusError(ProxyError):
    """An error status from OpenRouter, relayed with its status, ``code`` and ``metadata``.

    ``upstream`` is OpenRouter's inner ``error`` object (§4.1: ``message``, numeric
    ``code``, optional ``metadata`` and ``availability``); ``retry_after`` is the upstream
    ``Retry-After`` header value, passed on to the client when it is one (seconds, or an
    HTTP date; anything else is dropped, so no arbitrary upstream text rides on it).
    """

    def __init__(self, status: int, upstream: dict[str, Any], *, retry_after: str | None = None) -> None:
        message = upstream.get("message")
        super().__init__(message if isinstance(message, str) else f"OpenRouter returned HTTP {status}")
        self.upstream_status = status
        self.upstream = upstream
        self.retry_after = retry_after if retry_after is not None and _RETRY_AFTER.match(retry_after) else None

    def redact(self, redact: Callable[[str], str]) -> None:
        """Apply ``redact`` to the message and every string of the relayed error object."""
        self.message = redact(self.message)
        self.args = (self.message,)
        redact_strings(self.upstream, redact)

    def status_code(self) -> int:
        return self.upstream_status

    def error_object(self) -> dict[str, Any]:
        code = self.upstream.get("code", self.upstream_status)
        default_type = "server_error" if self.upstream_status >= 500 else "invalid_request_error"
        obj: dict[str, Any] = {
            "message": self.message,
            "type": _RELAYED_TYPES.get(self.upstream_status, default_type),
            "param": None,
            "code": code,
        }
        for extra in ("metadata", "availability"):
            if extra in self.upstream:
                obj[extra] = self.upstream[extra]
        return obj

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", self.retry_after.encode("latin-1"))]

    def retry_hint(self) -> bool | None:
        return False if self.upstream_status in _NOT_RETRYABLE else None


class UpstreamKeyRejected(ProxyError):
    """OpenRouter answered 401: the proxy's own upstream key is wrong. The operator's problem."""

    status = 502
    type = "upstream_authentication_error"
    code = "upstream_key_rejected"
    should_retry = False


class UpstreamOutOfCredits(ProxyError):
    """OpenRouter answered 402: the proxy's account or key is out of credits."""

    status = 503
    type = "upstream_insufficient_credits"
    code = "upstream_payment_required"
    should_retry = False


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_connection_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """No answer in time. ``phase``: ``connect``, ``first_byte``, ``first_token`` or ``total``."""

    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"

    def __init__(self, message: str, *, phase: str = "first_byte") -> None:
        super().__init__(message)
        self.phase = phase


class CircuitOpen(ProxyError):
    """Every model of the request is behind an open circuit breaker: fail fast."""

    status = 503
    type = "upstream_unavailable"
    code = "circuit_open"


class Unavailable(ProxyError):
    """The gateway is starting or stopping."""

    status = 503
    type = "service_unavailable"
    code = "starting_or_stopping"


class StoreDown(ProxyError):
    """The shared store did not answer an admin or report request."""

    status = 503
    type = "service_unavailable"
    code = "store_unavailable"


class RequestTimeout(ProxyError):
    """The client sent its request body too slowly."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    should_retry = False


class RateLimited(ProxyError):
    """A gateway rate limit was hit. ``headers``: ``retry-after``, ``retry-after-ms``,
    ``x-ratelimit-*`` as built by ``proxy.limits``; ``final`` adds ``x-should-retry: false``."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, headers: list[tuple[bytes, bytes]] | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.headers = headers or []
        self.final = final

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers

    def retry_hint(self) -> bool | None:
        return False if self.final else None


class QuotaExceeded(RateLimited):
    """A USD budget cannot cover the request's worst-case cost."""

    type = "insufficient_quota"
    code = "insufficient_quota"


_RETRY_SOON = [(b"retry-after", b"1"), (b"retry-after-ms", b"1000")]


class LimitsUnavailable(ProxyError):
    """The limits store is unreachable and the failure policy is ``fail_closed``."""

    status = 503
    type = "server_error"
    code = "limits_unavailable"

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [*_RETRY_SOON, (b"x-proxy-degraded", b"store-unavailable")]


class UsageUnavailable(ProxyError):
    """A usage report (``/admin/usage``, ``/v1/usage``) could not read the store."""

    status = 503
    type = "server_error"
    code = "usage_unavailable"

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return _RETRY_SOON


class UpstreamBusy(ProxyError):
    """Upstream pacing: the queue for an upstream slot is full or the wait timed out."""

    status = 503
    type = "server_error"
    code = "upstream_busy"

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return _RETRY_SOON


_JSON = (b"content-type", b"application/json")


def render_error(error: ProxyError, request_id: str | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Render ``error`` as ``(status, headers, body)`` in OpenAI's error envelope."""
    body = orjson.dumps({"error": error.error_object()})
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    if error.retry_hint() is False or error.retries_spent:
        headers.append((b"x-should-retry", b"false"))
    headers.extend(error.extra_headers())
    return error.status_code(), headers, body


class UpstreamCut(UpstreamUnreachable):
    """The upstream body broke off or timed out after the response had started."""

    code = "upstream_stream_cut"
