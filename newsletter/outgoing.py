"""One reader's outgoing message, pure: their links, the issue prepared once, and the
message built for one reader from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from newsletter.addresses import domain_of, parse_from_address
from newsletter.message import CompiledMessage, IssueMessageSpec, Recipient
from newsletter.message import make_message_id as _make_message_id
from newsletter.placeholders import Markers
from newsletter.provenance import MessageIds
from newsletter.tokens import LinkSigner, Purpose, link

if TYPE_CHECKING:
    from newsletter.bounces import Verp
    from newsletter.dkim import DkimSigner
    from newsletter.models import Issue, IssueVariant, MailingList


@dataclass(frozen=True)
class Links:
    """Builds a reader's personal links from the subscription's opaque token, and each
    delivery's Message-ID (whose MAC proves a returned report is about it)."""

    base_url: str
    signer: LinkSigner
    message_ids: MessageIds

    def unsubscribe(self, token: str) -> str:
        return link(
            self.base_url, Purpose.UNSUBSCRIBE, self.signer.sign(Purpose.UNSUBSCRIBE, token)
        )

    def preferences(self, token: str) -> str:
        return link(
            self.base_url, Purpose.PREFERENCES, self.signer.sign(Purpose.PREFERENCES, token)
        )

    def confirm(self, token: str) -> str:
        return link(self.base_url, Purpose.CONFIRM, self.signer.sign(Purpose.CONFIRM, token))

    def unsubscribe_mailto(self, list_address: str, token: str) -> str:
        return self.reader(list_address, token)[2]

    def reader(self, list_address: str, token: str) -> tuple[str, str, str]:
        """A reader's (unsubscribe URL, preferences URL, unsubscribe mailto), with the
        unsubscribe token signed once for both the URL and the mailto. The mailto goes to
        the list's own From address with the signed token in the subject; the inbox
        processor turns it into an unsubscribe."""
        unsubscribe = self.signer.sign(Purpose.UNSUBSCRIBE, token)
        return (
            link(self.base_url, Purpose.UNSUBSCRIBE, unsubscribe),
            self.preferences(token),
            f"mailto:{list_address}?subject=unsubscribe%20{unsubscribe}",
        )


@dataclass(frozen=True)
class PreparedIssue:
    """Everything per issue that per-recipient sending needs; built once per worker process."""

    issue_id: int
    list_id: int
    envelope_from: str
    list_address: str
    domain: str
    nonce: str
    compiled: CompiledMessage
    verp: Verp | None = None

    def envelope_for(self, delivery_id: int) -> str:
        """The SMTP envelope sender: a per-delivery VERP address when BOUNCE_DOMAIN is set
        (so a bounce names its delivery even when the report is mangled), else From."""
        return self.verp.address(delivery_id) if self.verp is not None else self.envelope_from


def prepare_issue(
    issue: Issue,
    mlist: MailingList,
    *,
    subject_prefix: str = "",
    variant: IssueVariant | None = None,
    dkim: DkimSigner | None = None,
    verp: Verp | None = None,
) -> PreparedIssue:
    _name, address = parse_from_address(mlist.from_address)
    domain = domain_of(address)
    safe_name = mlist.name.replace('"', "").replace("\\", "")
    list_id = (
        f'"{safe_name}" <{mlist.slug}.{domain}>'
        if safe_name.isascii()
        else f"<{mlist.slug}.{domain}>"
    )
    spec = IssueMessageSpec(
        subject=subject_prefix + issue.subject,
        from_address=mlist.from_address,
        reply_to=mlist.reply_to,
        list_id=list_id,
        html=variant.html if variant is not None else issue.html,
        text=variant.text if variant is not None else issue.text,
        message_id_domain=domain,
        markers=Markers(issue.marker_key),
    )
    return PreparedIssue(
        issue_id=issue.id,
        list_id=mlist.id,
        envelope_from=address,
        list_address=address,
        domain=domain,
        nonce=issue.nonce,
        compiled=CompiledMessage.compile(spec, dkim=dkim),
        verp=verp,
    )


def build_for(
    prepared: PreparedIssue,
    links: Links,
    *,
    delivery_id: int,
    email: str,
    name: str | None,
    token: str,
    date: str,
) -> tuple[bytes, str]:
    message_id = _make_message_id(
        delivery_id, links.message_ids.tag(delivery_id, prepared.nonce), prepared.domain
    )
    unsubscribe_url, preferences_url, unsubscribe_mailto = links.reader(
        prepared.list_address, token
    )
    recipient = Recipient(
        email=email,
        name=name,
        unsubscribe_url=unsubscribe_url,
        preferences_url=preferences_url,
        unsubscribe_mailto=unsubscribe_mailto,
        message_id=message_id,
    )
    return prepared.compiled.build(recipient, date=date), message_id
