"""Byte-level helpers shared by the emulator: numbers, ids, headers, error envelopes.

OpenRouter's backend is JavaScript, so JSON numbers are printed by ``Number#toString``
(ECMA-262 §6.1.6.1.20): positional for 1e-6 <= |x| < 1e21 (``0.0000075``), exponent
form outside (``7.5e-7``), never Python's ``7.5e-06``.  orjson prints floats the Python
way, so every money value is formatted here and embedded as a raw ``orjson.Fragment``.
"""

from __future__ import annotations

import base64
import random
from decimal import Decimal
from functools import lru_cache
from typing import Final

import orjson

from proxy.emulator.types import Headers

__all__ = [
    "CORS_HEADERS",
    "JSON_HEADERS",
    "SSE_HEADERS",
    "error_body",
    "js_number",
    "new_generation_id",
    "random_alnum",
]

_TO_ALNUM: Final = bytes.maketrans(b"+/", b"Qz")
"""base64 → ``[A-Za-z0-9]``: the two non-alphanumerics become letters (ids, not secrets)."""

CORS_HEADERS: Final[Headers] = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", b"X-Generation-Id,X-Provider-Name,cf-ray"),
    (b"vary", b"Accept-Encoding"),
]
"""Sent on every response (openrouter-api.md §5, fixtures/errors/README.md)."""

JSON_HEADERS: Final[Headers] = [(b"content-type", b"application/json"), *CORS_HEADERS]
SSE_HEADERS: Final[Headers] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    *CORS_HEADERS,
]


@lru_cache(maxsize=8192)
def js_number(value: Decimal | int) -> str:
    """Format ``value`` exactly as JavaScript's ``Number#toString`` would.

    Values with more than 15 significant digits are first rounded through a double
    (what the JS backend holds); shorter ones print their exact digits.  Memoised: the
    same prices and token counts recur.
    """
    dec = Decimal(value)
    if not dec.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    if dec == 0:
        return "0"
    sign, digit_tuple, exponent = dec.normalize().as_tuple()
    if len(digit_tuple) > 15:
        sign, digit_tuple, exponent = Decimal(repr(float(dec))).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = exponent + k  # value = 0.<digits> * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return "-" + text if sign else text


def random_alnum(rng: random.Random, length: int) -> str:
    """``length`` characters from ``[A-Za-z0-9]``."""
    raw = base64.b64encode(rng.randbytes(-(-length * 3 // 4)))
    return raw.translate(_TO_ALNUM)[:length].decode()


def new_generation_id(rng: random.Random, now: int) -> str:
    """``gen-<unix seconds>-<20 alphanumerics>`` (openrouter-api.md §2.1)."""
    return f"gen-{now}-{random_alnum(rng, 20)}"


def error_body(message: str, code: int, metadata: dict[str, object] | None = None) -> bytes:
    """OpenRouter error envelope ``{"error":{"message","code","metadata"?}}`` (§4.1), compact."""
    error: dict[str, object] = {"message": message, "code": code}
    if metadata is not None:
        error["metadata"] = metadata
    return orjson.dumps({"error": error})
