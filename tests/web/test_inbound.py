"""The mailto: half of List-Unsubscribe: a mail to the list address whose subject is
"unsubscribe <signed token>" yields that token (pure, no services)."""

from __future__ import annotations

from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from newsletter.inbound import unsubscribe_token
from newsletter.outgoing import Links
from newsletter.provenance import MessageIds
from newsletter.tokens import LinkSigner, Purpose, TokenError

SIGNER = LinkSigner(["test-secret-key"])
LINKS = Links("https://news.example.org", SIGNER, MessageIds(["message-id-key"]))
TOKEN = "dvYyNvhK8T2knu-XN1nH9Q"


def mail_from_mailto(mailto: str, *, subject_prefix: str = "") -> bytes:
    """What a mail client sends when the reader picks the mailto: unsubscribe."""
    parts = urlsplit(mailto)
    msg = EmailMessage()
    msg["From"] = "Ada <ada@example.org>"
    msg["To"] = unquote(parts.path)
    msg["Subject"] = subject_prefix + parse_qs(parts.query)["subject"][0]
    msg.set_content("This message was sent automatically to unsubscribe.\n")
    return msg.as_bytes()


def test_the_token_of_a_digests_mailto_comes_back_and_verifies() -> None:
    mailto = LINKS.unsubscribe_mailto("desk@example.org", TOKEN)
    signed = unsubscribe_token(mail_from_mailto(mailto))
    assert signed is not None
    assert SIGNER.unsign(Purpose.UNSUBSCRIBE, signed) == TOKEN


@pytest.mark.parametrize("prefix", ["", "Re: ", "FWD: Re: ", "  "])
def test_reply_prefixes_and_spacing_are_tolerated(prefix: str) -> None:
    mailto = LINKS.unsubscribe_mailto("desk@example.org", TOKEN)
    data = mail_from_mailto(mailto, subject_prefix=prefix).replace(
        b"unsubscribe ", b"UNSUBSCRIBE   "
    )
    assert unsubscribe_token(data) == SIGNER.sign(Purpose.UNSUBSCRIBE, TOKEN)


@pytest.mark.parametrize(
    "subject",
    [
        None,
        "",
        "Hello",
        "unsubscribe",
        "unsubscribe me please",
        "Undelivered Mail Returned to Sender",
        f"unsubscribe {TOKEN}",  # no signature
        f"please unsubscribe {TOKEN}.abcdefghijklmnopqrstuvwxyz",
        f"unsubscribe {TOKEN}.abcdefghijklmnopqrstuvwxyz extra",
        "unsubscribe <script>.alert(1)</script>",
    ],
)
def test_anything_else_is_not_an_unsubscribe(subject: str | None) -> None:
    msg = EmailMessage()
    msg["From"] = "someone@example.org"
    if subject is not None:
        msg["Subject"] = subject
    msg.set_content("hi\n")
    assert unsubscribe_token(msg) is None
    assert unsubscribe_token(msg.as_bytes()) is None


def test_a_forged_token_is_found_but_does_not_verify() -> None:
    forged = f"{TOKEN}.{'A' * 43}"
    msg = EmailMessage()
    msg["Subject"] = f"unsubscribe {forged}"
    found = unsubscribe_token(msg)
    assert found == forged
    with pytest.raises(TokenError):
        SIGNER.unsign(Purpose.UNSUBSCRIBE, found)


def test_an_encoded_subject_is_decoded() -> None:
    signed = SIGNER.sign(Purpose.UNSUBSCRIBE, TOKEN)
    raw = (
        "From: a@example.org\r\nTo: desk@example.org\r\n"
        f"Subject: =?utf-8?q?unsubscribe_{signed.replace('-', '=2D')}?=\r\n\r\nbye\r\n"
    ).encode()
    assert unsubscribe_token(raw) == signed
