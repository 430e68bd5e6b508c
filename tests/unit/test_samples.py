"""The sample reader of previews and test copies is nobody (pure)."""

from __future__ import annotations

from newsletter import issues
from newsletter.samples import SAMPLE_EMAIL, SAMPLE_TOKEN, is_sample_token
from newsletter.subscriptions import new_token
from newsletter.tokens import LinkSigner, Purpose, exact_form


def test_the_sample_token_is_no_subscriptions_token() -> None:
    assert is_sample_token(SAMPLE_TOKEN)
    assert not is_sample_token(SAMPLE_TOKEN.upper())
    assert not is_sample_token(SAMPLE_TOKEN + "x")
    assert not is_sample_token("")
    # real tokens are 22 (new_token) or 32 (an import) characters
    assert len(SAMPLE_TOKEN) not in (len(new_token()), 32)
    assert not any(is_sample_token(new_token()) for _ in range(100))


def test_sample_links_are_signed_in_the_exact_form() -> None:
    signer = LinkSigner(["k" * 40])
    for purpose in (Purpose.UNSUBSCRIBE, Purpose.PREFERENCES):
        signed = signer.sign(purpose, SAMPLE_TOKEN)
        assert exact_form(signed, timestamped=False)
        assert signer.unsign(purpose, signed) == SAMPLE_TOKEN


def test_previews_use_the_sample_reader() -> None:
    reader = issues.sample_reader()
    assert reader.email == SAMPLE_EMAIL and SAMPLE_EMAIL.endswith(".invalid")
    assert reader.token == SAMPLE_TOKEN and reader.name
