"""hsu.peer: the proof a call to an instance carries with the cluster key
(docs/multihost.md). End to end across hosts: contrib/hsu-plugin-etcd/tests/
test_calls_across_hosts.py."""

from __future__ import annotations

import pytest

from hsu import peer

KEY = "a-cluster-key-for-the-tests-0123"
ADDRESS = "10.0.0.5:40001"
METHOD = "/hsu.echo.v1.Echo/Echo"


def verifier(address: str = ADDRESS) -> peer.PeerVerifier:
    v = peer.PeerVerifier(KEY)
    v.address = address
    return v


def test_a_proof_verifies_for_its_instance_and_method_only() -> None:
    name, value = peer.PeerSigner(KEY).header(ADDRESS, METHOD)
    assert name == peer.METADATA
    assert verifier().verify(value, METHOD)
    assert not verifier("10.0.0.6:40001").verify(value, METHOD)
    v = verifier()
    assert v.verify(value, METHOD)  # now remembered ...
    assert not v.verify(value, "/hsu.echo.v1.Echo/EchoStream")  # ... for its method only
    assert not peer.PeerVerifier("another-key-0123456789").verify(value, METHOD)


def test_a_stale_or_malformed_proof_is_refused() -> None:
    signer = peer.PeerSigner(KEY)
    _, value = signer.header(ADDRESS, METHOD)
    t = int(value.split(".")[0])
    assert verifier().verify(value, METHOD, now=t + peer.MAX_AGE)
    assert not verifier().verify(value, METHOD, now=t + peer.MAX_AGE + 1)
    for bad in ("", ".", "x.y", f"{t}.", f"{t}.{'A' * 43}", value + "x"):
        assert not verifier().verify(bad, METHOD), bad
    # a verifier that does not know its own address yet accepts nothing
    assert not peer.PeerVerifier(KEY).verify(value, METHOD)


def test_a_short_key_is_refused_and_the_env_gives_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        peer.PeerSigner("short")
    monkeypatch.delenv(peer.ENV_KEY, raising=False)
    assert peer.signer() is None
    monkeypatch.setenv(peer.ENV_KEY, KEY)
    made = peer.signer()
    assert made is not None and verifier().verify(made.header(ADDRESS, METHOD)[1], METHOD)
    added = made.add((("a", "1"),), ADDRESS, METHOD)
    assert added[0] == ("a", "1") and added[1][0] == peer.METADATA
