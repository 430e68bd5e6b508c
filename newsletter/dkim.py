"""DKIM signing (RFC 6376), relaxed/relaxed, with RSA-SHA256 or Ed25519-SHA256 (RFC 8463).

Pure: keys come in as bytes or key objects, messages as bytes; only :func:`write_private_key`
touches a file (for ``newsletter dkim keygen``). The signing itself is OpenSSL's, through
``cryptography``; the canonicalization is done here, and most of it once per issue:

* :meth:`DkimSigner.body_plan` canonicalizes the constant chunks of a compiled message once;
  per message only the short per-recipient values are checked and the pieces hashed.
* :meth:`DkimSigner.signature_header` canonicalizes the dozen header fields of one message,
  builds the ``DKIM-Signature`` field and makes the one private-key operation.

:meth:`DkimSigner.sign` does the same for any message (confirmation emails, tests, checks).

Signed fields (``h=``): From, To, Subject, Date, Message-ID, MIME-Version, Reply-To, List-Id,
List-Unsubscribe, List-Unsubscribe-Post and Content-Type. Each is "over-signed" (named once
more than it occurs, RFC 6376 section 8.15), so that adding a second Subject, From or
List-Unsubscribe to a signed message, or a Reply-To that was not there, breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from newsletter.errors import InvalidInput

SIGNED_HEADERS: Final = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Reply-To",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Content-Type",
)
"""The header fields every signature covers (those absent are still named, so that nobody
can add them later)."""

REQUIRED_SIGNED: Final = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
"""What a newsletter message's signature must cover (Gmail/Yahoo bulk rules, RFC 8058)."""

RSA_BITS: Final = 2048
ALGORITHMS: Final = ("rsa", "ed25519")

# Only the white space relaxed canonicalization changes: runs of two or more, and tabs.
_WSP_RUN: Final = re.compile(rb"\t[ \t]*| [ \t]+")
_TRAILING_WSP: Final = re.compile(rb"[ \t]+\r\n")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_FOLD_WIDTH: Final = 76
_MEMO_SIZE: Final = 64
_B64_LINE: Final = 72


class DkimError(InvalidInput):
    """A DKIM key, domain or selector that cannot be used; one line for the operator."""


# --- keys ----------------------------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def generate_private_key(algorithm: str = "rsa") -> PrivateKey:
    """A new signing key: RSA-2048 (what every receiver accepts) or Ed25519 (RFC 8463,
    small and fast; receivers that do not know it ignore the signature)."""
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise DkimError(f"unknown DKIM algorithm {algorithm!r} (choose rsa or ed25519)")


def private_key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what DKIM_KEY_FILE holds)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse a PEM private key (PKCS#8 or the traditional RSA form); RSA of at least 1024
    bits (2048 recommended) or Ed25519."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DkimError(f"not a usable unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimError(f"RSA key of {key.key_size} bits is too small (use 2048)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError("DKIM keys must be RSA or Ed25519")


def write_private_key(path: Path, key: PrivateKey, *, overwrite: bool = False) -> None:
    """Write the PEM key readable by its owner only (0600), never through a wider mode and
    never through a symlink: the key goes to a new temporary file beside `path` (created
    0600, O_EXCL) and is then renamed over the name, so a symlink or file already there is
    replaced as a directory entry (with `overwrite`) or refused, and whatever a symlink
    pointed at is left untouched. A reader sees the old key or the new one, never half."""
    import tempfile

    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise DkimError(f"cannot write {path}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(private_key_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path, follow_symlinks=False)  # refuses any existing name
    except FileExistsError:
        raise DkimError(f"{path} already exists (use --force to replace it)") from None
    except OSError as exc:
        raise DkimError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def dns_txt_value(key: PrivateKey) -> str:
    """The TXT record value that publishes the public half: ``v=DKIM1; k=...; p=...``."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def zone_file_line(name: str, value: str) -> str:
    """A zone-file TXT line, the value cut in strings of at most 255 octets (RFC 1035)."""
    pieces = [value[i : i + 250] for i in range(0, len(value), 250)]
    quoted = " ".join(f'"{piece}"' for piece in pieces)
    return f"{name}. IN TXT ( {quoted} )"


def check_domain(domain: str, what: str = "DKIM domain") -> str:
    """``domain`` lower-cased and IDNA-encoded (A-labels), or DkimError."""
    value = domain.strip().rstrip(".").lower()
    if not value:
        raise DkimError(f"{what} is empty")
    if not value.isascii():
        import idna

        try:
            value = idna.encode(value, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise DkimError(f"{what} {domain!r} is not a valid domain: {exc}") from None
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        raise DkimError(f"{what} {domain!r} is not a valid domain name")
    return value


def check_selector(selector: str) -> str:
    value = selector.strip().lower()
    if not value or not all(_LABEL.fullmatch(x) for x in value.split(".")):
        raise DkimError(f"DKIM selector {selector!r} must be letters, digits and '-'")
    return value


# --- canonicalization (RFC 6376 section 3.4) -----------------------------------------------------


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """``name:value`` relaxed: name lower-cased, value unfolded, WSP runs as one space,
    stripped; followed by CRLF."""
    value = value.replace(b"\r\n", b"")
    if b"\n" in value:
        value = value.replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.strip().lower() + b":" + value.strip() + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical body: no WSP at line ends, WSP runs as one space, no empty
    lines at the end, and a final CRLF unless the body is empty."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        # Line by line: a regex over the whole body tries a match at every space.
        lines = body.split(b"\r\n")
        last = len(lines) - 1
        for index, line in enumerate(lines):
            if b"\t" in line or b"  " in line or line.endswith(b" "):
                line = _WSP_RUN.sub(b" ", line)
                lines[index] = line if index == last else line.rstrip(b" ")
        body = b"\r\n".join(lines)
    return _end_lines(body)


def _end_lines(body: bytes) -> bytes:
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == 0:
        return b""
    return body[:end] + b"\r\n"


def body_hash(body: bytes) -> bytes:
    """SHA-256 of the relaxed canonical body (the value behind ``bh=``)."""
    return hashlib.sha256(relaxed_body(body)).digest()


_FIELD_START: Final = re.compile(rb"\r\n(?![ \t])")


class BodyHashPlan:
    """The relaxed body hash of a compiled message, canonicalized once per issue.

    ``chunks`` is the body cut into constant chunks and per-recipient slots (None). Each
    constant chunk is canonicalized here assuming that its neighbours are slot values that
    neither start nor end with white space; :meth:`digest` checks that assumption on the
    values of one message (a few short byte strings) and falls back to canonicalizing the
    whole body when it does not hold, so the hash is always the RFC's.
    """

    __slots__ = ("_canon", "_slots")

    def __init__(self, chunks: Sequence[bytes | None]) -> None:
        if not chunks or chunks[-1] is None:
            raise ValueError("the body must end with a constant chunk")
        canon: list[bytes] = []
        slots: list[int] = []
        last = len(chunks) - 1
        for index, chunk in enumerate(chunks):
            if chunk is None:
                slots.append(index)
                canon.append(b"")
                continue
            fragment = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", chunk))
            if index == last:
                fragment = _end_lines(fragment)
                if not fragment:
                    raise ValueError("the body must not end in blank lines after a value")
            canon.append(fragment)
        self._canon = canon
        self._slots = tuple(slots)

    def digest(self, pieces: Sequence[bytes]) -> bytes:
        """The body hash of the body made of ``pieces`` (the chunks with each slot filled)."""
        canon = self._canon.copy()
        for index in self._slots:
            value = pieces[index]
            if (
                not value
                or value[0] in b" \t\r\n"
                or value[-1] in b" \t"
                or b"\t" in value
                or b"  " in value
                or b" \r\n" in value
            ):
                return body_hash(b"".join(pieces))
            canon[index] = value
        digest = hashlib.sha256()
        for piece in canon:
            digest.update(piece)
        return digest.digest()


# --- signing -------------------------------------------------------------------------------------


class DkimSigner:
    """Signs messages for one domain and selector with one key."""

    def __init__(
        self,
        key: PrivateKey,
        *,
        domain: str,
        selector: str,
        headers: Sequence[str] = SIGNED_HEADERS,
        oversign: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.domain = check_domain(domain)
        self.selector = check_selector(selector)
        self.clock = clock
        self._names = tuple(h.lower().encode("ascii") for h in headers)
        self._oversign = oversign
        if isinstance(key, ed25519.Ed25519PrivateKey):
            self.algorithm = "ed25519-sha256"
            self._sign: Callable[[bytes], bytes] = self._sign_ed25519
        elif isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "rsa-sha256"
            self._sign = self._sign_rsa
        else:  # pragma: no cover - guarded by the type
            raise DkimError("DKIM keys must be RSA or Ed25519")
        self._padding = padding.PKCS1v15()
        self._hash = hashes.SHA256()
        self._head = (
            f"DKIM-Signature: v=1; a={self.algorithm}; c=relaxed/relaxed; d={self.domain};"
            f"\r\n s={self.selector}; t="
        ).encode("ascii")
        self._h_cache: dict[tuple[int, ...], bytes] = {}

    @classmethod
    def from_pem(cls, pem: bytes, *, domain: str, selector: str) -> DkimSigner:
        return cls(load_private_key(pem), domain=domain, selector=selector)

    @classmethod
    def from_file(cls, path: str | Path, *, domain: str, selector: str) -> DkimSigner:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise DkimError(f"cannot read DKIM_KEY_FILE {path}: {exc.strerror}") from None
        return cls.from_pem(pem, domain=domain, selector=selector)

    @property
    def dns_name(self) -> str:
        """Where the public key is published: ``SELECTOR._domainkey.DOMAIN``."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_txt(self) -> str:
        return dns_txt_value(self.key)

    # -- per message --

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature field in front (bare LFs become CRLF first)."""
        if b"\n" in message and _BARE_LF.search(message):
            message = _BARE_LF.sub(b"\r\n", message)
        end = message.find(b"\r\n\r\n")
        if end < 0:
            head, body = message if message.endswith(b"\r\n") else message + b"\r\n", b""
        else:
            head, body = message[: end + 2], message[end + 4 :]
        return self.signature_header(head, body_hash(body)) + message

    def body_plan(self, chunks: Sequence[bytes | None]) -> BodyHashPlan | None:
        """Per-issue body canonicalization for :meth:`signature_header` (None: no plan
        possible, hash each body whole)."""
        try:
            return BodyHashPlan(chunks)
        except ValueError:
            return None

    def signature_header(
        self,
        header_block: bytes,
        body_digest: bytes,
        *,
        memo: dict[bytes, tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        """The ``DKIM-Signature: ...`` field (folded, ending in CRLF) for a message whose
        header block (fields, each ending in CRLF) is ``header_block`` and whose relaxed
        body hash is ``body_digest``.

        ``memo`` (one dict per issue) remembers the canonical form of fields already seen,
        so that the fields every message of an issue shares are canonicalized once."""
        by_name: dict[bytes, list[bytes]] = {}
        for field in _FIELD_START.split(header_block):
            if not field:
                continue
            known = memo.get(field) if memo is not None else None
            if known is None:
                name, _, value = field.partition(b":")
                name = name.strip().lower()
                known = (name, relaxed_header(name, value))
                if memo is not None and len(memo) < _MEMO_SIZE:
                    memo[field] = known
            if known[0] in by_name:
                by_name[known[0]].append(known[1])
            else:
                by_name[known[0]] = [known[1]]
        counts: list[int] = []
        signed = bytearray()
        for name in self._names:
            # RFC 6376 5.4.2: the n-th mention of a name in h= is its n-th instance counted
            # from the bottom; a mention with no instance left hashes nothing.
            found = by_name.get(name)
            if found is None:
                counts.append(0)
                continue
            counts.append(len(found))
            for canonical in reversed(found):
                signed += canonical
        head = (
            self._head
            + str(int(self.clock())).encode("ascii")
            + b";\r\n "
            + self._h_tag(tuple(counts))
            + b";\r\n bh="
            + base64.b64encode(body_digest)
            + b";\r\n b="
        )
        _name, _, value = head.partition(b":")
        signed += relaxed_header(b"DKIM-Signature", value)[:-2]  # without its CRLF
        signature = base64.b64encode(self._sign(bytes(signed)))
        folded = b"\r\n ".join(
            signature[i : i + _B64_LINE] for i in range(0, len(signature), _B64_LINE)
        )
        return head + folded + b"\r\n"

    def _h_tag(self, counts: tuple[int, ...]) -> bytes:
        tag = self._h_cache.get(counts)
        if tag is None:
            mentions: list[bytes] = []
            for name, count in zip(self._names, counts, strict=True):
                mentions += [name] * (count + 1 if self._oversign else count)
            lines: list[bytes] = []
            line = b"h="
            for index, name in enumerate(mentions):
                piece = name + (b":" if index < len(mentions) - 1 else b"")
                if len(line) + len(piece) > _FOLD_WIDTH - 1:
                    lines.append(line)
                    line = b""
                line += piece
            lines.append(line)
            tag = b"\r\n ".join(lines)
            self._h_cache[counts] = tag
        return tag

    def _sign_rsa(self, data: bytes) -> bytes:
        assert isinstance(self.key, rsa.RSAPrivateKey)
        return self.key.sign(data, self._padding, self._hash)

    def _sign_ed25519(self, data: bytes) -> bytes:
        # RFC 8463: Ed25519 signs the SHA-256 digest of the canonicalized header data.
        assert isinstance(self.key, ed25519.Ed25519PrivateKey)
        return self.key.sign(hashlib.sha256(data).digest())


def signer_from_settings(domain: str, selector: str, key_file: str) -> DkimSigner | None:
    """The signer the three DKIM settings describe; None when none is set, DkimError when
    only some are or the key cannot be used."""
    given = [bool(domain), bool(selector), bool(key_file)]
    if not any(given):
        return None
    if not all(given):
        raise DkimError(
            "DKIM needs all of NEWSLETTER_DKIM_DOMAIN, NEWSLETTER_DKIM_SELECTOR and "
            "NEWSLETTER_DKIM_KEY_FILE (or none of them)"
        )
    return DkimSigner.from_file(key_file, domain=domain, selector=selector)
