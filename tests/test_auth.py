from __future__ import annotations

import pytest

from proxy.auth import KEY_PREFIX, Keyring, hash_key, new_key
from proxy.errors import AuthenticationFailed


def keyring() -> Keyring:
    return Keyring(
        [(hash_key("sk-proxy-alice"), "alice", "research", None), (hash_key("sk-proxy-bob"), "bob", None, "free")]
    )


def test_known_key_resolves_to_its_principal() -> None:
    principal = keyring().authenticate(b"Bearer sk-proxy-alice")
    assert (principal.name, principal.team) == ("alice", "research")
    assert principal.key_id == hash_key("sk-proxy-alice")[:12]
    assert keyring().authenticate(b"bearer   sk-proxy-bob ").tier == "free"


@pytest.mark.parametrize(
    "header", [None, b"", b"Bearer", b"Bearer ", b"Basic sk-proxy-alice", b"sk-proxy-alice", b"Bearer sk-proxy-alicE"]
)
def test_missing_malformed_or_wrong_key_is_401(header: bytes | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        keyring().authenticate(header)
    assert info.value.status == 401
    assert "sk-proxy-alice" not in info.value.message


def test_new_keys_are_random_and_prefixed() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(k.startswith(KEY_PREFIX) and len(k) > 40 for k in keys)
    assert len(hash_key(next(iter(keys)))) == 64


def test_a_key_without_a_tier_gets_the_limits_policy_s_default_tier() -> None:
    entries = [(hash_key("sk-proxy-a"), "a", None, None), (hash_key("sk-proxy-b"), "b", None, "pro")]
    ring = Keyring(entries, default_tier="free")
    assert ring.authenticate(b"Bearer sk-proxy-a").tier == "free"
    assert ring.authenticate(b"Bearer sk-proxy-b").tier == "pro"
    ring.set_runtime([(hash_key("sk-proxy-c"), "c", None, None)])
    assert ring.authenticate(b"Bearer sk-proxy-c").tier == "free"
