"""Double opt-in: build the confirmation email (pure) and send it (one transport call).

Used by the web app, in-process after the response, and by the `newsletter.send_confirmation`
Celery task when a broker is configured. This module imports nothing from FastAPI.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

import jinja2
from sqlalchemy.orm import Session, sessionmaker

from newsletter.addresses import domain_of, mask_address, parse_from_address
from newsletter.compose import render_confirmation
from newsletter.dkim import DkimSigner
from newsletter.message import check_header_value, format_date
from newsletter.models import MailingList, Subscriber, Subscription, SubscriptionStatus
from newsletter.outgoing import Links
from newsletter.transport import Outcome, SendResult, Transport, session_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfirmationMail:
    sender: str  # envelope sender (the list's address)
    recipient: str
    data: bytes


def build_confirmation(
    env: jinja2.Environment,
    *,
    list_name: str,
    from_address: str,
    reply_to: str | None,
    to_email: str,
    confirm_url: str,
    date: str | None = None,
    message_id: str | None = None,
) -> ConfirmationMail:
    """The confirmation email as RFC 5322 bytes (CRLF, folded headers). Pure.

    It is a transactional message, not a list message: no List-Unsubscribe, and no display
    name in To (the name typed into a public form is not shown to the address's owner before
    they confirm).
    """
    rendered = render_confirmation(list_name, confirm_url, env)
    _display, address = parse_from_address(from_address)
    check_header_value(to_email, "recipient email")
    msg = EmailMessage(policy=SMTP)
    msg["From"] = from_address
    msg["To"] = to_email
    msg["Subject"] = check_header_value(rendered.subject, "subject")
    msg["Date"] = date or format_date()
    msg["Message-ID"] = message_id or make_msgid(
        idstring="c" + secrets.token_hex(6), domain=domain_of(address)
    )
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rendered.text, cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    return ConfirmationMail(sender=address, recipient=to_email, data=msg.as_bytes())


def confirmation_for(
    session: Session, env: jinja2.Environment, links: Links, subscription_id: int
) -> ConfirmationMail | None:
    """The confirmation mail still worth sending for this subscription, or None: the reader
    confirmed already, complained, or was erased since the form was posted."""
    sub = session.get(Subscription, subscription_id)
    if sub is None or sub.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.COMPLAINED):
        return None
    person = session.get(Subscriber, sub.subscriber_id)
    mlist = session.get(MailingList, sub.list_id)
    if person is None or mlist is None:
        return None
    return build_confirmation(
        env,
        list_name=mlist.name,
        from_address=mlist.from_address,
        reply_to=mlist.reply_to,
        to_email=person.email,
        confirm_url=links.confirm(sub.token),
    )


def send_confirmation(
    sessions: sessionmaker[Session],
    transport: Transport,
    env: jinja2.Environment,
    links: Links,
    subscription_id: int,
    *,
    dkim: DkimSigner | None = None,
) -> SendResult | None:
    """Build and send one confirmation email (DKIM-signed when configured); None when there
    was nothing to send."""
    with sessions() as session:
        mail = confirmation_for(session, env, links, subscription_id)
    if mail is None:
        return None
    data = dkim.sign(mail.data) if dkim is not None else mail.data
    with session_of(transport) as conn:
        result = conn.send(mail.sender, mail.recipient, data)
    if result.outcome is not Outcome.SENT:
        # The address is personal data: log the subscription id, not the address, and not
        # the server's reply as it came (replies usually quote the address or its local part).
        log.warning(
            "confirmation for subscription %d not sent: %s",
            subscription_id,
            mask_address(result.describe(), mail.recipient),
        )
    return result
