"""One derived key per purpose, wired by the runtime: links, VERP and rate limits each use
their own key derived from SECRET_KEY, and what was signed with the raw keys before still
verifies (mail already sent keeps working)."""

from __future__ import annotations

from newsletter.bounces import Verp
from newsletter.config import Settings
from newsletter.keys import derive
from newsletter.runtime import Runtime
from newsletter.tokens import LinkSigner, Purpose

KEYS = "new-secret-key,old-secret-key"


def runtime(**overrides: str) -> Runtime:
    values = {"secret_key": KEYS, "database_url": "sqlite://", **overrides}
    return Runtime(Settings(**values))  # type: ignore[arg-type]


def test_links_are_signed_with_the_derived_links_key() -> None:
    signer = runtime().links.signer
    signed = signer.sign(Purpose.UNSUBSCRIBE, "tok")
    assert signed == LinkSigner([derive("new-secret-key", "links")]).sign(
        Purpose.UNSUBSCRIBE, "tok"
    )
    assert signed != LinkSigner(["new-secret-key"]).sign(Purpose.UNSUBSCRIBE, "tok")


def test_links_signed_with_the_raw_keys_before_still_verify() -> None:
    signer = runtime().links.signer
    for raw in ("new-secret-key", "old-secret-key"):
        old_link = LinkSigner([raw]).sign(Purpose.UNSUBSCRIBE, "tok")
        assert signer.unsign(Purpose.UNSUBSCRIBE, old_link) == "tok"


def test_verp_macs_use_the_derived_verp_key_and_accept_the_raw_ones() -> None:
    verp = runtime(bounce_domain="bounces.example.org").verp
    assert verp is not None
    derived = Verp("bounces.example.org", [derive("new-secret-key", "verp")])
    assert verp.address(7) == derived.address(7)
    raw = Verp("bounces.example.org", ["old-secret-key"]).address(7)
    assert verp.delivery_of(raw) == 7
    assert verp.delivery_of(verp.address(7)) == 7


def test_rate_limits_have_their_own_key() -> None:
    rt = runtime()
    assert rt.rate_limit_key == derive("new-secret-key", "rate-limit")
    assert rt.rate_limit_key not in ("new-secret-key", derive("new-secret-key", "links"))
