"""Wiring: build the adapters (engine, sessions, transport, links, policy) from settings.

Only entry points (CLI, web app, worker app) call this; the package below receives the
pieces through arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

import jinja2
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from newsletter import provenance
from newsletter.bounces import Verp
from newsletter.config import Settings
from newsletter.db import make_engine, make_sessionmaker
from newsletter.dkim import DkimSigner, signer_from_settings
from newsletter.feedback import FeedbackPolicy
from newsletter.keys import derive, derive_all
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.outgoing import Links
from newsletter.provenance import MessageIds
from newsletter.ratelimit import Throttle, make_throttle
from newsletter.suppression import load_key as load_suppression_key
from newsletter.tokens import LinkSigner
from newsletter.transport import OutboxTransport, SmtpTransport, Transport


@dataclass
class Runtime:
    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)

    @cached_property
    def engine(self) -> Engine:
        return self._engine or make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def transport(self) -> Transport:
        smtp = self.settings.smtp()
        if smtp is not None:
            return SmtpTransport(smtp)
        return OutboxTransport(self.settings.outbox_dir)

    @cached_property
    def links(self) -> Links:
        """Signed with the derived links key; links signed with the raw keys before keys
        were derived per purpose still verify, so mail already sent keeps working."""
        keys = self.settings.secret_keys
        signer = LinkSigner([*derive_all(keys, "links"), *keys])
        return Links(self.settings.base_url, signer, self.message_ids)

    @cached_property
    def message_ids(self) -> MessageIds:
        """Message-IDs whose MAC proves which delivery a returned report is about."""
        return MessageIds(derive_all(self.settings.secret_keys, provenance.PURPOSE))

    @cached_property
    def policy(self) -> DeliveryPolicy:
        s = self.settings
        return DeliveryPolicy(
            suppression_key=self.suppression_key,
            lease_seconds=s.lease_seconds,
            retry_base_seconds=s.retry_base_seconds,
            retry_max_seconds=s.retry_max_seconds,
            retry_deadline=timedelta(hours=s.retry_deadline_hours),
            max_consecutive_failures=s.max_consecutive_failures,
            feedback=self.feedback_policy,
        )

    @cached_property
    def templates(self) -> jinja2.Environment:
        from newsletter.compose import make_environment  # premailer: only when rendering

        return make_environment(self.settings.templates_dir)

    @cached_property
    def suppression_key(self) -> str:
        """The suppression store's own key, kept in the database sealed under SECRET_KEY, so
        that a rotation of SECRET_KEY keeps erased addresses out (newsletter.suppression)."""
        return load_suppression_key(self.sessions, self.settings.secret_keys)

    @cached_property
    def rate_limit_key(self) -> str:
        """Keys the hashed addresses of rate-limit counters (short-lived: they may rotate)."""
        return derive(self.settings.secret_keys[0], "rate-limit")

    @cached_property
    def dkim_signer(self) -> DkimSigner | None:
        """None unless DKIM_DOMAIN, DKIM_SELECTOR and DKIM_KEY_FILE are all set."""
        s = self.settings
        return signer_from_settings(s.dkim_domain, s.dkim_selector, s.dkim_key_file)

    @cached_property
    def verp(self) -> Verp | None:
        s = self.settings
        return verp_from_settings(s)

    @cached_property
    def feedback_policy(self) -> FeedbackPolicy:
        s = self.settings
        return FeedbackPolicy(
            s.soft_bounce_limit,
            s.complaint_pause_rate,
            s.complaint_pause_min,
            suppression_key=self.suppression_key,
        )

    def issue_cache(self) -> IssueCache:
        """Compiled messages per issue and variant, signed and VERP-addressed as configured."""
        return IssueCache(dkim=self.dkim_signer, verp=self.verp)

    def refuse_unsafe_send(self, session: Session, issue_id: int) -> None:
        """The production gate before a send or resume starts: in production, raise
        checks.SendRefused (a Conflict) while `issues check` reports an error."""
        from newsletter import checks  # dkimpy and the HTML audit: only where needed

        s = self.settings
        checks.refuse_unsafe_send(
            session,
            issue_id,
            self.links,
            signer=self.dkim_signer,
            postal_address=s.postal_address,
            in_production=s.production,
        )

    def throttle(self) -> Throttle | None:
        s = self.settings
        return make_throttle(s.rate_limit, s.domain_limits, broker_url=s.broker_url)


def verp_from_settings(s: Settings) -> Verp | None:
    """VERP addresses MAC'd with the derived VERP key; those of mail sent before keys were
    derived per purpose (MAC'd with the raw keys) still verify."""
    if not s.bounce_domain:
        return None
    return Verp(s.bounce_domain, [*derive_all(s.secret_keys, "verp"), *s.secret_keys])
