"""Virtual keys: the proxy's own API keys, stored only as SHA-256 hashes.

A client sends ``Authorization: Bearer <key>``; the key is hashed and looked up by its
digest, and the digest is compared with ``hmac.compare_digest``, so neither the lookup
nor the comparison leaks the secret through timing. The OpenRouter key is a different
thing entirely and never reaches this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.types import Principal

__all__ = ["KEY_PREFIX", "Keyring", "authorization_of", "check_admin", "hash_key", "new_key"]

KEY_PREFIX = "sk-proxy-"


def hash_key(secret: str) -> str:
    """The hex SHA-256 of a virtual key, as stored in config."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random virtual key: ``sk-proxy-`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal
    configured_tier: str | None  # as written (the principal's tier has the default filled in)


class Keyring:
    """Resolve bearer tokens to ``Principal``s.

    Built once from the config's ``(sha256_hex, name, team, tier)`` tuples; runtime keys
    (``proxy.keystore``) are swapped in whole by ``set_runtime``, and a config key wins a
    clash. A key without a tier gets ``default_tier`` (the limits policy's), so routing
    rules on ``tier`` see the tier its limits apply. ``authenticate`` raises
    ``AuthenticationFailed`` (401) for a missing, malformed or unknown key.
    """

    def __init__(
        self, entries: Iterable[tuple[str, str, str | None, str | None]], default_tier: str | None = None
    ) -> None:
        self._default_tier = default_tier
        self._by_digest = _entries(entries, default_tier)
        self._runtime: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._by_digest) + len(self._runtime)

    def set_runtime(self, entries: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """Replace every runtime key (same tuples as the constructor)."""
        self._runtime = _entries(entries, self._default_tier)

    def config_principals(self) -> list[Principal]:
        """The keys from the config file (and the development key), as principals with their
        tier as configured (``None`` when the default tier applies)."""
        return [dataclasses.replace(e.principal, tier=e.configured_tier) for e in self._by_digest.values()]

    def authenticate(self, authorization: bytes | None) -> Principal:
        """Resolve the raw ``Authorization`` header value."""
        if not authorization:
            raise AuthenticationFailed("Missing API key: send your proxy key as 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hashlib.sha256(token).digest()
        entry = self._by_digest.get(digest) or self._runtime.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise AuthenticationFailed("Incorrect API key provided.")
        return entry.principal


def _entries(
    entries: Iterable[tuple[str, str, str | None, str | None]], default_tier: str | None
) -> dict[bytes, _Entry]:
    by_digest: dict[bytes, _Entry] = {}
    for sha256_hex, name, team, tier in entries:
        digest = bytes.fromhex(sha256_hex)
        principal = Principal(key_id=sha256_hex[:12], name=name, team=team, tier=tier or default_tier)
        by_digest[digest] = _Entry(digest, principal, tier)
    return by_digest


def check_admin(authorization: bytes | None, admin_sha256: str | None) -> None:
    """Accept only the admin key (``Bearer <key>``); 401 otherwise, 403 when none is configured."""
    if admin_sha256 is None:
        raise PermissionDenied("The admin API is disabled: set PROXY_ADMIN_KEY to enable it.")
    if not bearer_matches(authorization, admin_sha256):
        raise AuthenticationFailed("A valid admin key is required.")


def bearer_matches(authorization: bytes | None, token_sha256: str) -> bool:
    """Whether ``authorization`` is ``Bearer <token>`` with the token whose SHA-256 (hex) is
    ``token_sha256``; compared in constant time."""
    scheme, _, token = (authorization or b"").partition(b" ")
    token = token.strip()
    digest = hashlib.sha256(token).digest()
    return scheme.lower() == b"bearer" and bool(token) and hmac.compare_digest(digest, bytes.fromhex(token_sha256))


def authorization_of(headers: Mapping[str, str]) -> bytes | None:
    """The raw ``Authorization`` value from a headers mapping (Starlette's ``request.headers``)."""
    value = headers.get("authorization")
    return value.encode("latin-1") if value is not None else None
