"""The OpenRouter client: one pooled connection set per worker, errors translated here.

The hot path uses aiohttp's client directly: measured on the benchmark in
``loadtests/client_bench.py`` it costs about half the CPU per request of httpx's API over
the same transport (``docs/measurements/upstream-client-choice.md``). The body is sent and
received as bytes, untouched. The proxy asks for ``Accept-Encoding: identity``; an answer
encoded anyway (gzip, deflate) is decoded by aiohttp, so metering and clients always see
plain bytes (the encoding header is not relayed), and one that cannot be decoded breaks
off (``UpstreamCut``). Every aiohttp/asyncio exception is mapped to a ``proxy.errors``
class here:

* connect failure, reset before the response head -> ``UpstreamUnreachable`` (502)
* no response head / no byte within the timeouts  -> ``UpstreamTimeout`` (504)
* the body breaks off after the head               -> ``UpstreamCut``
* an error status from OpenRouter                  -> ``error_from_status`` (401 -> 502,
  402 -> 503, others relayed; openrouter-api.md §4)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from proxy.config import UpstreamSettings
from proxy.errors import (
    ProxyError,
    UpstreamCut,
    UpstreamKeyRejected,
    UpstreamOutOfCredits,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
    redact_strings,
)
from proxy.pacing import Pacer

__all__ = ["OpenRouterClient", "UpstreamResponse", "error_from_status"]

log = logging.getLogger("proxy.upstream")

# Upstream response headers relayed to the client (lower-case).
_RELAYED = frozenset({b"content-type", b"x-generation-id", b"x-provider-name", b"retry-after"})
_MAX_ERROR_BODY = 1 << 20
USER_AGENT = "openrouter-proxy/0.1"


class UpstreamResponse:
    """An upstream response whose head has arrived; the body is read or streamed once.

    ``headers``: the relayed subset, lower-case ``(name, value)`` byte pairs, ready for
    ASGI. ``generation_id``: the ``X-Generation-Id`` header (§5) or ``None``.
    """

    __slots__ = ("_response", "generation_id", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        headers = []
        generation_id = None
        for name, value in response.raw_headers:
            lower = name.lower()
            if lower in _RELAYED:
                headers.append((lower, value))
                if lower == b"x-generation-id":
                    generation_id = value.decode("latin-1")
        self.headers = headers
        self.generation_id = generation_id

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive. Raises ``UpstreamCut`` if the body breaks off."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamCut(f"The upstream response broke off: {type(exc).__name__}.") from exc

    async def read(self) -> bytes:
        """The whole body. Raises ``UpstreamCut`` if it breaks off or goes silent."""
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamCut(f"The upstream response broke off: {type(exc).__name__}.") from exc

    def close(self) -> None:
        """Release the connection; a body not fully read aborts it (cancels upstream)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class OpenRouterClient:
    """Pooled client for one upstream base URL. ``start`` inside the event loop."""

    def __init__(self, settings: UpstreamSettings, pacer: Pacer | None = None) -> None:
        self.settings = settings
        self.pacer = pacer
        self.base_url = settings.base_url
        self._api_key = settings.api_key.get_secret_value() if settings.api_key else ""
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if settings.app_url:
            headers["HTTP-Referer"] = settings.app_url
        if settings.app_title:
            headers["X-Title"] = settings.app_title
            headers["X-OpenRouter-Title"] = settings.app_title
        self._headers = headers
        self.forward_headers = frozenset(h.encode() for h in settings.forward_headers if not h.endswith("*"))
        self.forward_prefixes = tuple(h[:-1].encode() for h in settings.forward_headers if h.endswith("*"))
        self._session: aiohttp.ClientSession | None = None
        self._chat_url = f"{self.base_url}/chat/completions"

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,  # OpenRouter is asked for identity; a gzip answer anyway is decoded here
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_s,
                sock_read=self.settings.read_timeout_s,
            ),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def redact(self, text: str) -> str:
        """``text`` with the upstream key replaced, for anything relayed or logged."""
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    async def chat(self, body: bytes, forwarded: list[tuple[bytes, bytes]]) -> UpstreamResponse:
        """POST ``body`` to ``/chat/completions``; return once the response head arrived.

        ``forwarded`` are client headers already filtered by ``forward_headers`` and
        ``forward_prefixes``. With
        pacing on, first waits for a slot (``UpstreamBusy``, 503, when the queue is full).
        Raises ``UpstreamUnreachable``, ``UpstreamTimeout`` or, for an error status,
        what ``error_from_status`` gives (the body is read and the connection released).
        """
        headers: dict[str, str] = self._headers
        if forwarded:
            headers = dict(headers)
            for name, value in forwarded:  # (aiohttp writes values as UTF-8: decode them so)
                headers[name.decode("latin-1")] = value.decode("utf-8", "replace")
        pacer = self.pacer
        if pacer is not None and pacer.enabled:
            async with pacer.slot():
                response = await self._request("POST", self._chat_url, headers, body)
        else:
            response = await self._request("POST", self._chat_url, headers, body)
        if response.status >= 400:
            await self._raise_for_status(response)
        return UpstreamResponse(response)

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET ``base_url + path`` and decode JSON; error statuses raise as in ``chat``."""
        response = await self._request("GET", f"{self.base_url}{path}", self._headers, None, params)
        if response.status >= 400:
            await self._raise_for_status(response)
        wrapped = UpstreamResponse(response)
        try:
            return orjson.loads(await wrapped.read())
        except orjson.JSONDecodeError as exc:
            raise UpstreamUnreachable("OpenRouter returned a body that is not JSON.") from exc
        finally:
            wrapped.close()

    async def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        params: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        if self._session is None:
            raise UpstreamUnreachable("The upstream client is not started.")
        try:
            return await self._session.request(
                method, url, data=body, headers=headers, params=params, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeout("OpenRouter could not be reached in time.", phase="connect") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("OpenRouter did not answer in time.", phase="first_byte") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"OpenRouter could not be reached: {type(exc).__name__}.") from exc

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        try:
            raw = await response.content.read(_MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError, OSError):
            raw = b""
        finally:
            response.close()
        raise error_from_status(
            response.status,
            self.redact(raw.decode("utf-8", "replace")),
            response.headers.get("Retry-After"),
            self.redact,
        )


def error_from_status(
    status: int, body: str, retry_after: str | None, redact: Callable[[str], str] | None = None
) -> ProxyError:
    """The ``ProxyError`` for an OpenRouter error status (openrouter-api.md §4.1, §4.2).

    401 means the proxy's own key was refused (502, logged loudly); 402 means the proxy's
    account is out of credits (503); anything else is relayed with OpenRouter's status,
    numeric ``code``, ``metadata`` and ``availability``. ``redact`` is applied to every
    string of the decoded error (so a key spelled with JSON escapes is caught too) before it
    is logged or relayed.
    """
    inner: dict[str, Any] = {}
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        inner = parsed["error"]
        if redact is not None:
            redact_strings(inner, redact)
    if status == 401:
        log.error("OpenRouter rejected the proxy's API key (HTTP 401): %s", inner.get("message"))
        return UpstreamKeyRejected(
            "The gateway's upstream credentials were rejected by OpenRouter. "
            "This is a gateway configuration problem; contact the operator."
        )
    if status == 402:
        log.error("OpenRouter reports the proxy's account is out of credits (HTTP 402): %s", inner.get("message"))
        return UpstreamOutOfCredits("The gateway's OpenRouter account has insufficient credits. Contact the operator.")
    if not inner:
        inner = {"message": f"OpenRouter returned HTTP {status}.", "code": status}
    return UpstreamStatusError(status, inner, retry_after=retry_after)
