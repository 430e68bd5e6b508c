"""A real send with DKIM and VERP configured: every message that reaches the SMTP server
verifies with dkimpy (the reference implementation) and carries its own bounce address."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from sqlalchemy import select

from newsletter import issues
from newsletter.dkim import generate_private_key, write_private_key
from newsletter.ledger.sender import run_in_process
from newsletter.models import Delivery, Subscriber
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.integration.helpers import confirmed_addresses, deliveries, seed_world


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_delivered_messages_are_signed_and_carry_their_own_bounce_address(
    algorithm: str,
    db_url: str,
    smtp_server: SmtpServer,
    make_runtime: Callable[..., Runtime],
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "dkim.pem"
    write_private_key(key_file, generate_private_key(algorithm))
    rt = make_runtime(
        db_url,
        smtp_url=smtp_server.url,
        dkim_domain="example.org",
        dkim_selector="news",
        dkim_key_file=str(key_file),
        bounce_domain="bounces.example.org",
    )
    signer = rt.dkim_signer
    assert signer is not None
    records = {f"{signer.dns_name}.".encode(): signer.dns_txt().encode()}

    issue_id = seed_world(rt, confirmed=12)
    with rt.sessions() as s, s.begin():
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=5,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    run_in_process(
        rt.sessions,
        issue_id,
        batch_ids,
        rt.transport,
        rt.links,
        rt.policy,
        cache=rt.issue_cache(),
    )

    received = smtp_server.recorder.messages
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(12)
    for r in received:
        assert dkimpy.verify(r.data, dnsfunc=lambda name, timeout=5: records.get(name))
        tampered = r.data.replace(b"Subject: ", b"Subject: FREE ", 1)
        assert not dkimpy.verify(tampered, dnsfunc=lambda name, timeout=5: records.get(name))
    assert rt.verp is not None
    sender_of = {r.rcpt_tos[0]: r.mail_from for r in received}
    with rt.sessions() as s:
        email_of = dict(
            s.execute(
                select(Delivery.id, Subscriber.email)
                .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                .where(Delivery.issue_id == issue_id)
            ).all()
        )
    for row in deliveries(rt, issue_id):
        sender = sender_of[email_of[row.id]]
        assert sender.endswith("@bounces.example.org")
        assert rt.verp.delivery_of(sender) == row.id  # a bounce to it names this delivery
