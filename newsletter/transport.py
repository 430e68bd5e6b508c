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
    """The one table from SMTP reply codes to outcomes.

    2xx: accepted. 4xx: temporary. 552 (mailbox full / message too big for now): temporary,
    as RFC 5321 section 4.5.3.1.10 asks clients to treat it. Other 5xx: permanent.
    Anything else (a broken server): temporary, so a human can look before we give up.
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
    """One connection's worth of sending. `send` never raises for a delivery problem: every
    outcome is a SendResult. It may be called after a failure; it reconnects if it can."""

    def send(self, sender: str, recipient: str, data: bytes) -> SendResult: ...

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


class SmtpSession:
    """Connects lazily; after a 421 or a dropped connection it reconnects once on the next
    send. If connecting itself fails, the rest of the batch fails fast with that same
    temporary result instead of waiting out a timeout per message."""

    def __init__(self, config: SmtpConfig, local_hostname: str | None) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None
        self._dead: SendResult | None = None

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
        smtp.ehlo()
        if cfg.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if cfg.username:
            smtp.login(cfg.username, cfg.password or "")
        return smtp

    def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        if self._dead is not None:
            return self._dead
        if self._smtp is None:
            try:
                self._smtp = self._connect()
            except smtplib.SMTPConnectError as exc:
                self._dead = result(exc.smtp_code, exc.smtp_error, "connect")
                return self._dead
            except smtplib.SMTPAuthenticationError as exc:
                # Wrong credentials will not fix themselves per message, but an operator can
                # fix them: temporary, so the batch retries after the fix.
                self._dead = SendResult(
                    Outcome.TEMPORARY, exc.smtp_code, "SMTP authentication failed", "connect"
                )
                return self._dead
            except smtplib.SMTPResponseException as exc:
                self._dead = result(exc.smtp_code, exc.smtp_error, "connect")
                return self._dead
            except (OSError, smtplib.SMTPException) as exc:
                self._dead = SendResult(
                    Outcome.TEMPORARY, SOCKET_ERROR, f"connect failed: {exc}", "connect"
                )
                return self._dead
        smtp = self._smtp
        try:
            code, reply = smtp.mail(sender)
            if code != 250:
                return self._refused(code, reply, "mail")
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                return self._refused(code, reply, "rcpt")
            code, reply = smtp.data(data)
            if code != 250:
                return self._refused(code, reply, "data")
            return result(code, reply, "data")
        except smtplib.SMTPDataError as exc:  # DATA itself refused (not 354)
            return self._refused(exc.smtp_code, exc.smtp_error, "data")
        except (OSError, smtplib.SMTPException) as exc:
            self._drop()
            return SendResult(Outcome.TEMPORARY, SOCKET_ERROR, f"connection lost: {exc}", "data")

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
