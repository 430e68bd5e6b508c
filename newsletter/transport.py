"""Transports: the only code that hands message bytes to the outside world.

The delivery code declares what it needs (`Transport`, `TransportSession`) and every outcome,
whatever the adapter, comes back as a `SendResult` in our own vocabulary: sent, temporary or
permanent, with the SMTP code and reply and the stage it happened at.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from newsletter.config import SmtpConfig

# Socket errors, timeouts and dropped connections are reported as this local code, as GNU
# Mailman does: a temporary failure that says "the network, not the recipient".
SOCKET_ERROR = 444


class Outcome(enum.StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    code: int
    reply: str
    stage: str  # connect, mail, rcpt, data or outbox

    @property
    def hard_bounce(self) -> bool:
        """A permanent refusal of the recipient itself: never mail this address again."""
        return self.outcome is Outcome.PERMANENT and self.stage == "rcpt"

    def describe(self) -> str:
        return f"{self.code} {self.reply}".strip()[:1000]


def classify(code: int) -> Outcome:
    """The one table from SMTP reply codes to outcomes (docs/delivery-guarantees.md).

    | reply                         | outcome   | then                                        |
    | 2xx                           | sent      |                                             |
    | 421 (closing the connection)  | temporary | the session reconnects for the next message |
    | other 4xx                     | temporary | retried with backoff until the deadline     |
    | 552 (mailbox full, too big)   | temporary | RFC 5321 4.5.3.1.10 asks for this           |
    | 444: socket error or timeout  | temporary | our own code, as GNU Mailman's; reconnects  |
    | other 5xx                     | permanent | failed; at RCPT also a hard bounce          |
    | anything else (broken server) | temporary | so a human can look before we give up       |
    """
    if 200 <= code < 300:
        return Outcome.SENT
    if 500 <= code < 600 and code != 552:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY


def result(code: int, reply: bytes | str, stage: str) -> SendResult:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return SendResult(classify(code), code, " ".join(text.split()), stage)


class TransportSession(Protocol):
    """One connection's worth of sending. Nothing here raises for a delivery problem: every
    outcome is a SendResult. It may be called after a failure; it reconnects if it can.

    A message goes either in one step, `send`, or in two: `begin` hands over everything but
    the step that makes the server take the message (SMTP: envelope, DATA and the body, not
    the final "."), then `finish` takes that step, or `abandon` drops the message instead
    (SMTP: the connection is closed; the server discards a message it never saw end). The
    delivery loop records the previous outcome between the two steps, so at most one
    message per connection is ever accepted but not yet recorded."""

    def send(self, sender: str, recipient: str, data: bytes) -> SendResult: ...

    def ready(self) -> SendResult | None:
        """Connect now if not connected (a rate limit's token is then followed by the
        message alone, not by a connection's setup). A SendResult: no connection can be
        made, the result `begin` would give."""
        ...

    def begin(self, sender: str, recipient: str, data: bytes) -> SendResult | None:
        """None: ready to `finish` or `abandon`. A SendResult: the message ended here."""
        ...

    def finish(self) -> SendResult: ...

    def abandon(self) -> None: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Opens sessions; a batch of messages goes through one session (one SMTP connection)."""

    def open(self) -> TransportSession: ...


class _SessionContext:
    def __init__(self, session: TransportSession) -> None:
        self.session = session

    def __enter__(self) -> TransportSession:
        return self.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.session.close()


def session_of(transport: Transport) -> _SessionContext:
    """`with session_of(transport) as s:` closes the connection whatever happens."""
    return _SessionContext(transport.open())


# --- SMTP ------------------------------------------------------------------------------------


class SmtpTransport:
    def __init__(self, config: SmtpConfig, *, local_hostname: str | None = None) -> None:
        self.config = config
        self.local_hostname = local_hostname

    def open(self) -> SmtpSession:
        return SmtpSession(self.config, self.local_hostname)


def _body(data: bytes) -> bytes:
    """The message as DATA carries it, without the final ".": dot-stuffed, ending in CRLF.

    smtplib dot-stuffs every message with re.sub over the whole body (~15% of a sender's
    CPU for a 40 KB digest). Our messages end in CRLF and rarely have a line starting with
    "."; a search finds those, and only they pay for the substitution. (A compiled search
    for LF + "." takes half the time of `b"\r\n." in data`, 12 vs 24 us for 36 KB, since
    the substring search stops at every CR of the body.)
    """
    if data.startswith(b".") or _LINE_DOT.search(data) is not None:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_DOT = re.compile(rb"\n\.")


class SmtpSession:
    """Connects lazily; after a 421 or a dropped connection it reconnects on the next send.
    If connecting itself fails, the rest of the batch fails fast with that same temporary
    result instead of waiting out a timeout per message."""

    def __init__(self, config: SmtpConfig, local_hostname: str | None) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None
        self._dead: SendResult | None = None
        self._pipelining = False

    def _connect(self) -> smtplib.SMTP:
        cfg = self.config
        smtp: smtplib.SMTP
        if cfg.ssl:
            smtp = smtplib.SMTP_SSL(
                cfg.host,
                cfg.port,
                local_hostname=self.local_hostname,
                timeout=cfg.timeout,
                context=ssl.create_default_context(),
            )
        else:
            smtp = smtplib.SMTP(
                cfg.host, cfg.port, local_hostname=self.local_hostname, timeout=cfg.timeout
            )
        # The final "." goes out as a small write of its own after the body (see `finish`):
        # without TCP_NODELAY, Nagle's algorithm holds it until the server's delayed ACK.
        if smtp.sock is not None:
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo()
        if cfg.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if cfg.username:
            smtp.login(cfg.username, cfg.password or "")
        return smtp

    def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        return self.begin(sender, recipient, data) or self.finish()

    def ready(self) -> SendResult | None:
        if self._dead is not None:
            return self._dead
        return self._open() if self._smtp is None else None

    def begin(self, sender: str, recipient: str, data: bytes) -> SendResult | None:
        if self._dead is not None:
            return self._dead
        reused = self._smtp is not None
        outcome = self._start(sender, recipient, data)
        if (
            reused
            and outcome is not None
            and outcome.code == SOCKET_ERROR
            and outcome.stage == "mail"
        ):
            # The server dropped the connection while it sat idle between two messages
            # (idle timeout, restart). Nothing of this message left us: try a fresh one.
            outcome = self._start(sender, recipient, data)
        return outcome

    def finish(self) -> SendResult:
        """The final ".": from sending it until its reply arrives the server may have taken
        the message without our knowing, the one window SMTP leaves open."""
        smtp = self._smtp
        if smtp is None:
            return SendResult(Outcome.TEMPORARY, SOCKET_ERROR, "connection lost", "data")
        try:
            smtp.send(b".\r\n")
            code, reply = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self._drop()
            return SendResult(Outcome.TEMPORARY, SOCKET_ERROR, f"connection lost: {exc}", "data")
        if code != 250:
            return self._refused(code, reply, "data")
        return result(code, reply, "data")

    def abandon(self) -> None:
        # Closing the connection in the middle of DATA is the only way SMTP offers to take
        # a message back; the next message connects afresh.
        self._drop()

    def _open(self) -> SendResult | None:
        """Connect; on failure remember why, for the rest of this session."""
        try:
            self._smtp = self._connect()
            self._pipelining = self._smtp.has_extn("pipelining")
            return None
        except smtplib.SMTPConnectError as exc:  # the greeting was not 220, e.g. 421
            self._dead = result(exc.smtp_code, exc.smtp_error, "connect")
        except smtplib.SMTPAuthenticationError as exc:
            # Wrong credentials will not fix themselves per message, but an operator can
            # fix them: temporary, so the batch retries after the fix.
            self._dead = SendResult(
                Outcome.TEMPORARY, exc.smtp_code, "SMTP authentication failed", "connect"
            )
        except smtplib.SMTPResponseException as exc:
            self._dead = result(exc.smtp_code, exc.smtp_error, "connect")
        except (OSError, smtplib.SMTPException) as exc:
            self._dead = SendResult(
                Outcome.TEMPORARY, SOCKET_ERROR, f"connect failed: {exc}", "connect"
            )
        return self._dead

    def _start(self, sender: str, recipient: str, data: bytes) -> SendResult | None:
        if self._smtp is None:
            failed = self._open()
            if failed is not None:
                return failed
        smtp = self._smtp
        assert smtp is not None
        stage = "mail"
        try:
            if self._pipelining and (sender + recipient).isascii():
                # RFC 2920: MAIL, RCPT and DATA in one write and their three replies read
                # in order: one round trip instead of three.
                smtp.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
                refusal: tuple[int, bytes, str] | None = None
                code = 0
                for stage, good in (("mail", (250,)), ("rcpt", (250, 251)), ("data", (354,))):
                    code, reply = smtp.getreply()
                    if code in good:
                        continue
                    if code == 421:  # the server is closing: no more replies will come
                        return self._refused(code, reply, stage)
                    refusal = refusal or (code, reply, stage)
                if refusal is not None:
                    if code == 354:  # DATA was taken all the same: hanging up is the way out
                        self._drop()
                        return result(*refusal)
                    return self._refused(*refusal)
            else:
                code, reply = smtp.mail(sender)
                if code != 250:
                    return self._refused(code, reply, stage)
                stage = "rcpt"
                code, reply = smtp.rcpt(recipient)
                if code not in (250, 251):
                    return self._refused(code, reply, stage)
                stage = "data"
                smtp.putcmd("data")
                code, reply = smtp.getreply()
                if code != 354:
                    return self._refused(code, reply, stage)
            stage = "data"
            smtp.send(_body(data))
            return None
        except (OSError, smtplib.SMTPException) as exc:
            self._drop()
            return SendResult(Outcome.TEMPORARY, SOCKET_ERROR, f"connection lost: {exc}", stage)

    def _refused(self, code: int, reply: bytes | str, stage: str) -> SendResult:
        if code == 421:  # the server is closing the connection
            self._drop()
        else:
            try:
                self._smtp and self._smtp.rset()
            except (OSError, smtplib.SMTPException):
                self._drop()
        return result(code, reply, stage)

    def _drop(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(OSError):
                self._smtp.close()
        self._smtp = None

    def close(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._smtp.quit()
            self._drop()


# --- outbox (Maildir) ---------------------------------------------------------------------------


class OutboxTransport:
    """The embedded default: each message becomes one file in a Maildir (tmp/ then new/), so a
    reader never sees half a message and any mail client can open the folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def open(self) -> OutboxSession:
        for sub in ("tmp", "new", "cur"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        return OutboxSession(self.directory)


_counter = itertools.count()


class OutboxSession:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._held: tuple[str, str, bytes] | None = None

    def ready(self) -> SendResult | None:
        return None

    def begin(self, sender: str, recipient: str, data: bytes) -> SendResult | None:
        self._held = (sender, recipient, data)
        return None

    def finish(self) -> SendResult:
        held, self._held = self._held, None
        if held is None:
            raise RuntimeError("finish() without begin()")
        return self.send(*held)

    def abandon(self) -> None:
        self._held = None

    def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{self.host}"
        tmp = self.directory / "tmp" / name
        try:
            with open(tmp, "wb") as fh:
                fh.write(f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode())
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self.directory / "new" / name)
        except OSError as exc:
            return SendResult(Outcome.TEMPORARY, SOCKET_ERROR, f"outbox: {exc}", "outbox")
        return SendResult(Outcome.SENT, 250, f"written to {name}", "outbox")

    def close(self) -> None:
        return None


_HEAD_BYTES = 64 * 1024  # of a file read for its headers (a message's headers are far less)


def erase_from_outbox(directory: Path, address: str) -> int:
    """Delete every outbox file addressed to `address` (in any case): in new/ and cur/, and
    in tmp/ a file a crash left half-written. Addressed: its headers (Delivered-To, To)
    name it. Returns how many went; a directory that is not there holds none."""
    needle = address.lower().encode()
    removed = 0
    for sub in ("tmp", "new", "cur"):
        folder = Path(directory) / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                with open(entry.path, "rb") as fh:
                    head = fh.read(_HEAD_BYTES)
            except FileNotFoundError:  # moved or removed meanwhile (a mail client)
                continue
            end = head.find(b"\r\n\r\n")
            if needle in (head if end < 0 else head[:end]).lower():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed
