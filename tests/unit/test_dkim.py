"""DKIM signatures as a receiving mail system checks them: dkimpy verifies every signature
against the published key (handed over through its dnsfunc hook: no DNS), for RSA-2048 and
Ed25519, and any change to a signed header breaks it."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
import random
import re
import stat
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed
from typer.testing import CliRunner

from newsletter.cli import app
from newsletter.compose import make_environment, render_issue
from newsletter.dkim import (
    REQUIRED_SIGNED,
    BodyHashPlan,
    DkimError,
    DkimSigner,
    body_hash,
    check_domain,
    generate_private_key,
    load_private_key,
    private_key_pem,
    relaxed_body,
    signer_from_settings,
    write_private_key,
)
from newsletter.message import (
    CompiledMessage,
    IssueMessageSpec,
    Recipient,
    format_date,
    make_message_id,
)
from newsletter.placeholders import Markers

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "example.org"
TOKEN = "Ab1cD2eF3gH4iJ5k.Zm9vYmFyYmF6cXV4LTEyMzQ1Njc4OTA"

# Keys are slow to make: one of each kind for the whole module.
KEYS = {"rsa": generate_private_key("rsa"), "ed25519": generate_private_key("ed25519")}


def signer_for(kind: str, **options: object) -> DkimSigner:
    return DkimSigner(KEYS[kind], domain=DOMAIN, selector=f"news-{kind}", **options)  # type: ignore[arg-type]


def dns_for(*signers: DkimSigner) -> Callable[..., bytes | None]:
    """A dnsfunc that knows the TXT records of ``signers`` and nothing else."""
    records = {f"{s.dns_name}.".encode(): s.dns_txt().encode() for s in signers}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def verifies(message: bytes, signer: DkimSigner) -> bool:
    return bool(dkimpy.verify(message, dnsfunc=dns_for(signer)))


def digest_spec(**changes: object) -> IssueMessageSpec:
    rendered = render_issue(_context(), make_environment(ROOT / "templates"))
    values: dict[str, object] = {
        "subject": rendered.subject,
        "from_address": "World Desk <desk@example.org>",
        "reply_to": None,
        "list_id": '"World Digest" <world.example.org>',
        "html": rendered.html,
        "text": rendered.text,
        "message_id_domain": DOMAIN,
        "markers": MARKERS,
    }
    values.update(changes)
    return IssueMessageSpec(**values)  # type: ignore[arg-type]


def _context():  # type: ignore[no-untyped-def]
    import datetime

    from newsletter.compose import DigestArticle, DigestContext

    articles = [
        DigestArticle(
            section=("World", "Climate", "Économie")[i % 3],
            title=f"Talks resume in Genève, day {i}  —  “wins”",
            summary="Delegations met for six hours.   Tabs\tand  runs of spaces stay. " * 3,
            url=f"https://example.org/articles/{i}",
        )
        for i in range(6)
    ]
    return DigestContext(
        markers=MARKERS,
        list_name="World Digest",
        list_slug="world",
        issue_date=datetime.date(2026, 11, 28),
        subject="World Digest, 28 Nov 2026",
        articles=articles,
        postal_address="World Desk, 1 Test Street, Testville",
        archive_url="https://news.example.org/archive/world/7",
    )


def recipient(number: int, name: str | None) -> Recipient:
    token = f"{TOKEN}{number}"
    return Recipient(
        email=f"reader{number}@example.com",
        name=name,
        unsubscribe_url=f"https://news.example.org/unsubscribe/{token}",
        preferences_url=f"https://news.example.org/preferences/{token}",
        unsubscribe_mailto=f"mailto:desk@example.org?subject=unsubscribe%20{token}",
        message_id=make_message_id(number, "a1b2c3d4e5f6", DOMAIN),
    )


NAMES = (None, "Ada Lovelace", "José Ñúñez", "李小龍", 'Bob "The Builder" O\'Neil', "x" * 190)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_every_built_message_verifies_with_dkimpy(kind: str) -> None:
    signer = signer_for(kind)
    compiled = CompiledMessage.compile(digest_spec(), dkim=signer)
    date = format_date()
    for number, name in enumerate(NAMES):
        data = compiled.build(recipient(number, name), date=date)
        assert data.startswith(b"DKIM-Signature: v=1; a=" + signer.algorithm.encode())
        assert verifies(data, signer), name


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_says_what_the_providers_ask_for(kind: str) -> None:
    signer = signer_for(kind)
    data = CompiledMessage.compile(digest_spec(), dkim=signer).build(
        recipient(1, "Ada"), date=format_date()
    )
    msg = email.message_from_bytes(data, policy=email.policy.default)
    tags = dict(
        part.strip().split("=", 1)
        for part in "".join(str(msg["DKIM-Signature"]).split()).split(";")
        if part.strip()
    )
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == DOMAIN and tags["s"] == f"news-{kind}"
    assert tags["a"] == {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}[kind]
    signed = tags["h"].split(":")
    for header in REQUIRED_SIGNED:
        # over-signed: named once more than it occurs, so a second one cannot be added
        assert signed.count(header.lower()) == 2, header
    assert "l" not in tags  # no body length limit: nothing can be appended
    header_block = data[: data.index(b"\r\n\r\n")]
    assert max(len(line) for line in header_block.split(b"\r\n")) <= 998
    signature_lines = data[: data.index(b"\r\nFrom:")].split(b"\r\n")
    assert max(len(line) for line in signature_lines) <= 78


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("header", [*REQUIRED_SIGNED, "Content-Type"])
def test_changing_any_signed_header_breaks_the_signature(kind: str, header: str) -> None:
    signer = signer_for(kind)
    data = CompiledMessage.compile(digest_spec(), dkim=signer).build(
        recipient(3, "Ada Lovelace"), date=format_date()
    )
    assert verifies(data, signer)
    pattern = re.compile(rb"^(" + re.escape(header.encode()) + rb":[^\r]*?)(.)(\r\n)", re.M)
    tampered, count = pattern.subn(
        lambda m: m.group(1) + (b"X" if m.group(2) != b"X" else b"Y") + m.group(3), data, 1
    )
    assert count == 1, header
    assert not verifies(tampered, signer)


@pytest.mark.parametrize(
    "extra",
    [
        b"Subject: Your account is locked\r\n",
        b"From: Bank <security@bank.example>\r\n",
        b"List-Unsubscribe: <https://evil.example/u>\r\n",
        b"Reply-To: <collector@evil.example>\r\n",  # absent from the message, signed anyway
        b"To: other@example.com\r\n",
    ],
)
def test_adding_a_second_signed_header_breaks_the_signature(extra: bytes) -> None:
    signer = signer_for("rsa")
    data = CompiledMessage.compile(digest_spec(), dkim=signer).build(
        recipient(4, None), date=format_date()
    )
    end = data.index(b"\r\n\r\n") + 2
    assert not verifies(data[:end] + extra + data[end:], signer)


def test_changing_the_body_breaks_the_signature_and_unsigned_headers_do_not() -> None:
    signer = signer_for("rsa")
    data = CompiledMessage.compile(digest_spec(), dkim=signer).build(
        recipient(5, "Ada"), date=format_date()
    )
    assert not verifies(data.replace(b"Delegations met", b"Delegations fled", 1), signer)
    relayed = b"Received: from relay.example.net by mx.example.com\r\n" + data
    assert verifies(relayed, signer)
    rewrapped = data.replace(b"\r\nSubject: ", b"\r\nSubject:   ", 1)  # relaxed: same
    assert verifies(rewrapped, signer)


def test_a_wrong_published_key_fails() -> None:
    signer = signer_for("rsa")
    other = DkimSigner(generate_private_key("rsa"), domain=DOMAIN, selector="news-rsa")
    data = CompiledMessage.compile(digest_spec(), dkim=signer).build(
        recipient(6, None), date=format_date()
    )
    assert not dkimpy.verify(data, dnsfunc=dns_for(other))


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_sign_any_message_with_bare_newlines_or_no_body(kind: str) -> None:
    signer = signer_for(kind)
    msg = EmailMessage()
    msg["From"] = "World Desk <desk@example.org>"
    msg["To"] = "reader@example.com"
    msg["Subject"] = "Confirm your subscription"
    msg["Date"] = format_date()
    msg.set_content("Line one\n\n\tindented\twith tabs   and spaces   \n\n\n")
    signed = signer.sign(msg.as_bytes(policy=email.policy.SMTP))
    assert verifies(signed, signer)
    assert verifies(signer.sign(msg.as_bytes()), signer)  # LF line ends become CRLF
    bare = signer.sign(b"From: desk@example.org\r\nSubject: hi\r\n")
    assert verifies(bare, signer)


def test_unsigned_compile_is_unchanged_and_signed_by_none_unsigns() -> None:
    plain = CompiledMessage.compile(digest_spec())
    person = recipient(7, "Ada")
    date = format_date()
    unsigned = plain.build(person, date=date)
    signed = plain.signed_by(signer_for("ed25519")).build(person, date=date)
    assert signed.endswith(unsigned) and signed.startswith(b"DKIM-Signature:")
    assert plain.signed_by(signer_for("rsa")).signed_by(None).build(person, date=date) == unsigned


# --- canonicalization, against dkimpy's own -------------------------------------------------


def test_relaxed_body_matches_dkimpy_on_awkward_bodies() -> None:
    rng = random.Random(8)
    alphabet = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b"=", b"."]
    bodies = [b"", b"\r\n", b"\r\n\r\n", b"x", b"x ", b"x\r\n\r\n\r\n", b" \t \r\n"]
    bodies += [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(400)]
    for body in bodies:
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body
        assert body_hash(body) == hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


def test_body_plan_equals_whole_body_canonicalization() -> None:
    """The per-issue plan must give the RFC's hash for any value, including values that
    break its assumptions (it then falls back to the whole body)."""
    rng = random.Random(9)
    edges = [b"", b" ", b"  ", b"\t", b"x", b"x ", b" x", b"\r\n", b" \r\n", b"x\r\n"]
    values = [b"Ada", b"Ada Lovelace", b"Ada  Lovelace", b" Ada", b"Ada ", b"A\tB", b"A=\r\n"]
    for _ in range(600):
        pieces: list[bytes | None] = []
        for _slot in range(rng.randrange(1, 4)):
            pieces.append(rng.choice(edges) + b"text" + rng.choice(edges))
            pieces.append(None)
        pieces.append(rng.choice(edges) + b"end" + rng.choice(edges[:6]) + b"\r\n")
        plan = BodyHashPlan(pieces)
        filled = [p if p is not None else rng.choice(values) for p in pieces]
        assert plan.digest(filled) == body_hash(b"".join(filled)), filled


def test_real_digest_bodies_take_the_precomputed_path() -> None:
    compiled = CompiledMessage.compile(digest_spec(), dkim=signer_for("ed25519"))
    plan = compiled._dkim_plan
    assert plan is not None
    calls: list[bytes] = []
    import newsletter.dkim as module

    original = module.body_hash
    module.body_hash = lambda body: calls.append(body) or original(body)  # type: ignore[assignment,func-returns-value]
    try:
        for number, name in enumerate(NAMES):
            compiled.build(recipient(number, name), date=format_date())
    finally:
        module.body_hash = original
    assert calls == []


# --- keys, settings, keygen ----------------------------------------------------------------


def test_keys_round_trip_through_pem_and_refuse_garbage() -> None:
    for kind in ("rsa", "ed25519"):
        pem = private_key_pem(KEYS[kind])
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        assert private_key_pem(load_private_key(pem)) == pem
    with pytest.raises(DkimError, match="PEM"):
        load_private_key(b"not a key")
    with pytest.raises(DkimError, match="rsa or ed25519"):
        generate_private_key("dsa")


def test_settings_need_all_three_values(tmp_path: Path) -> None:
    assert signer_from_settings("", "", "") is None
    with pytest.raises(DkimError, match="all of"):
        signer_from_settings("example.org", "news", "")
    with pytest.raises(DkimError, match="cannot read"):
        signer_from_settings("example.org", "news", str(tmp_path / "missing.pem"))


def test_domains_are_idna_encoded_and_checked() -> None:
    assert check_domain("Zeitung.Bücher.example") == "zeitung.xn--bcher-kva.example"
    for bad in ("", "localhost", "exa mple.org", "-bad.example", "a..example"):
        with pytest.raises(DkimError):
            check_domain(bad)
    with pytest.raises(DkimError):
        DkimSigner(KEYS["rsa"], domain=DOMAIN, selector="bad selector")


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(
    kind: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "news.pem"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["dkim", "keygen", "--selector", "news", "--domain", "Bücher.example", "--out",
         str(key_file), "--algorithm", kind],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    line = next(x for x in result.stdout.splitlines() if "IN TXT" in x)
    assert line.startswith("news._domainkey.xn--bcher-kva.example. IN TXT (")
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    assert record.startswith(f"v=DKIM1; k={kind}; p=")
    signer = DkimSigner.from_file(key_file, domain="bücher.example", selector="news")
    data = signer.sign(b"From: desk@xn--bcher-kva.example\r\nSubject: hi\r\n\r\nbody\r\n")
    assert dkimpy.verify(data, dnsfunc=lambda name, timeout=5: record.encode())
    again = runner.invoke(
        app, ["dkim", "keygen", "--selector", "news", "--domain", "example.org", "--out",
              str(key_file)],
    )  # fmt: skip
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)


def test_ed25519_record_carries_the_raw_public_key() -> None:
    signer = signer_for("ed25519")
    p = signer.dns_txt().split("p=", 1)[1]
    assert len(base64.b64decode(p)) == 32


def test_placeholders_are_unaffected_by_signing() -> None:
    data = CompiledMessage.compile(digest_spec(), dkim=signer_for("ed25519")).build(
        recipient(9, "Ada"), date=format_date()
    )
    for marker in MARKERS.all:
        assert marker.encode() not in data


def test_write_private_key_replaces_a_file_only_when_told_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "news.pem"
    write_private_key(path, KEYS["ed25519"])
    first = path.read_bytes()
    with pytest.raises(DkimError, match="already exists"):
        write_private_key(path, KEYS["rsa"])
    assert path.read_bytes() == first
    path.chmod(0o644)
    write_private_key(path, KEYS["rsa"], overwrite=True)
    assert path.read_bytes() == private_key_pem(KEYS["rsa"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["news.pem"]
    with pytest.raises(DkimError, match="cannot write"):
        write_private_key(tmp_path / "missing" / "news.pem", KEYS["rsa"])


def test_write_private_key_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "news.pem"
    link.symlink_to(target)
    write_private_key(link, KEYS["ed25519"], overwrite=True)
    assert target.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == private_key_pem(KEYS["ed25519"])
