"""Bounces, complaints and mailed unsubscribes applied to real subscriptions, after a real
send to the recording SMTP server. The samples of tests/data/bounces are returned for real
deliveries (their VERP address, Message-ID and recipient swapped for the real ones).
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from newsletter import feedback, feedback_figures, issues, subscriptions
from newsletter.bounces import EventType, Verp
from newsletter.feedback import AppliedEvent, EventOutcome, FeedbackPolicy
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.freeze import start_send
from newsletter.ledger.sender import run_in_process, send_batch
from newsletter.ledger.status import issue_status
from newsletter.models import (
    BounceEvent,
    Delivery,
    DeliveryStatus,
    Event,
    IssueStatus,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer, cli_env, run_cli
from tests.integration.helpers import KEY, seed_world

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "bounces"
BOUNCE_DOMAIN = "bounces.example.org"
SAMPLE_NONCE = "a1b2c3d4e5f6"
SAMPLE_VERP = Verp(BOUNCE_DOMAIN, [KEY])
# One applied event as the webhook answers it and `bounces ingest --json` prints it.
EVENT_FIELDS = (
    "type", "source", "status", "outcome", "subscriber", "delivery", "issue", "paused_issue",
    "summary",
)  # fmt: skip

# sample: (its delivery id, its recipient, the reader's status afterwards, soft bounce count)
SHAPES: dict[str, tuple[int, str | None, SubscriptionStatus, int]] = {
    "rfc3464_hard.eml": (1201, "ann@example.com", SubscriptionStatus.BOUNCED, 0),
    "rfc3464_soft.eml": (1202, "ben@example.net", SubscriptionStatus.ACTIVE, 1),
    "postfix_hard.eml": (1203, "carol@example.com", SubscriptionStatus.BOUNCED, 0),
    "postfix_delayed.eml": (1204, "dan@example.com", SubscriptionStatus.ACTIVE, 0),
    "exchange_ndr.eml": (1205, "erin@contoso.example", SubscriptionStatus.BOUNCED, 0),
    "exchange_legacy_text.eml": (1206, "frank@fabrikam.example", SubscriptionStatus.BOUNCED, 0),
    "gmail_hard.eml": (1207, "gina.example@gmail.com", SubscriptionStatus.BOUNCED, 0),
    "gmail_over_quota.eml": (1208, "hugo.example@gmail.com", SubscriptionStatus.ACTIVE, 1),
    "yahoo_text.eml": (1209, "frank.example@yahoo.com", SubscriptionStatus.BOUNCED, 0),
    "arf_complaint.eml": (1210, None, SubscriptionStatus.COMPLAINED, 0),
    "auto_reply.eml": (1211, "ivan@example.com", SubscriptionStatus.ACTIVE, 0),
    "mangled_dsn.eml": (1212, None, SubscriptionStatus.BOUNCED, 0),
    "human_reply.eml": (1201, "kim@example.com", SubscriptionStatus.ACTIVE, 0),
}


@pytest.fixture
def rt(db_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(
        db_url, smtp_url=smtp_server.url, bounce_domain=BOUNCE_DOMAIN, batch_size=50
    )


def verp(rt: Runtime) -> Verp:
    return Verp(rt.settings.bounce_domain, rt.settings.secret_keys)


def send(rt: Runtime, issue_id: int) -> None:
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)


def next_issue(rt: Runtime) -> int:
    """Another issue of the world list (re-using the ingested articles), sent."""
    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(2000, 1, 1, tzinfo=UTC),
        )
        issue_id = issue.id
    send(rt, issue_id)
    return issue_id


def the_delivery(rt: Runtime, issue_id: int, email: str) -> Delivery:
    with rt.sessions() as s:
        row = s.scalar(
            select(Delivery)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.issue_id == issue_id, Subscriber.email == email)
        )
        assert row is not None and row.status == DeliveryStatus.SENT
        return row


def returned(rt: Runtime, sample: str, issue_id: int, email: str) -> bytes:
    """The sample, as if it came back for the delivery of `issue_id` to `email`."""
    sample_id, sample_rcpt, _status, _soft = SHAPES.get(sample, (None, None, None, None))
    row = the_delivery(rt, issue_id, email)
    raw = (SAMPLES / sample).read_bytes().decode("utf-8")
    if sample_id is not None:
        raw = raw.replace(SAMPLE_VERP.address(sample_id), verp(rt).address(row.id))
        assert row.message_id is not None
        raw = raw.replace(f"<d{sample_id}.{SAMPLE_NONCE}@example.org>", row.message_id)
    if sample_rcpt is not None:
        raw = raw.replace(sample_rcpt, email)
    return raw.encode("utf-8")


def ingest(rt: Runtime, raw: bytes, *, with_verp: bool = True) -> list[AppliedEvent]:
    with rt.sessions() as s, s.begin():
        return feedback.ingest_message(
            s,
            raw,
            signer=rt.links.signer,
            message_ids=rt.message_ids,
            verp=verp(rt) if with_verp else None,
            policy=FeedbackPolicy(),
        )


def state(rt: Runtime, email: str, slug: str = "world") -> tuple[SubscriptionStatus, int]:
    with rt.sessions() as s:
        sub = subscriptions.find_subscription(s, email, slug)
        return sub.status, sub.soft_bounces


def test_every_sample_shape_acts_on_the_right_reader(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=len(SHAPES))
    send(rt, issue_id)
    readers = {name: f"reader{i}@example.org" for i, name in enumerate(sorted(SHAPES))}
    for sample, email in readers.items():
        ingest(rt, returned(rt, sample, issue_id, email))
    for sample, email in readers.items():
        _id, _rcpt, status, soft = SHAPES[sample]
        assert state(rt, email) == (status, soft), sample
    with rt.sessions() as s:
        sources = dict(
            s.execute(
                select(Event.kind, Event.source).where(Event.kind.in_(("bounced", "complained")))
            ).all()
        )
    assert sources == {"bounced": "bounce", "complained": "complaint"}


def test_a_hard_bounce_suppresses_at_once_and_the_next_issue_skips_the_reader(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=3)
    send(rt, issue_id)
    applied = ingest(rt, returned(rt, "postfix_hard.eml", issue_id, "reader1@example.org"))
    assert [a.outcome for a in applied] == [EventOutcome.SUPPRESSED]
    assert applied[0].delivery_id == the_delivery(rt, issue_id, "reader1@example.org").id
    assert state(rt, "reader1@example.org") == (SubscriptionStatus.BOUNCED, 0)
    smtp_server.recorder.messages.clear()
    next_issue(rt)
    assert sorted(smtp_server.recorder.recipients()) == [
        "reader0@example.org",
        "reader2@example.org",
    ]


def test_the_same_event_twice_changes_nothing(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=2)
    send(rt, issue_id)
    soft = returned(rt, "rfc3464_soft.eml", issue_id, "reader0@example.org")
    hard = returned(rt, "gmail_hard.eml", issue_id, "reader1@example.org")
    first = [a.outcome for raw in (soft, hard) for a in ingest(rt, raw)]
    again = [a.outcome for raw in (soft, hard) for a in ingest(rt, raw)]
    assert first == [EventOutcome.COUNTED, EventOutcome.SUPPRESSED]
    assert again == [EventOutcome.DUPLICATE, EventOutcome.DUPLICATE]
    # Another relay's report of the same failure of the same delivery is the same event.
    other_report = soft.replace(b"dsn.7f3a91c2@relay.example.net", b"other.99@relay2.example")
    assert [a.outcome for a in ingest(rt, other_report)] == [EventOutcome.DUPLICATE]
    assert state(rt, "reader0@example.org") == (SubscriptionStatus.ACTIVE, 1)
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(BounceEvent)) == 2
        assert s.scalar(select(func.count()).where(Event.kind == "bounced")) == 1


def test_soft_bounces_suppress_after_five_unless_a_delivery_comes_between(rt: Runtime) -> None:
    first = seed_world(rt, confirmed=2)
    send(rt, first)
    sent = [first] + [next_issue(rt) for _ in range(5)]
    steady, lucky = "reader0@example.org", "reader1@example.org"
    for number, issue_id in enumerate(sent[:4], start=1):
        for email in (steady, lucky):
            ingest(rt, returned(rt, "gmail_over_quota.eml", issue_id, email))
        assert state(rt, steady) == (SubscriptionStatus.ACTIVE, number)
    # The fifth issue reaches `lucky` (no bounce); the sixth soft-bounces for both.
    ingest(rt, returned(rt, "gmail_over_quota.eml", sent[4], steady))
    assert state(rt, steady) == (SubscriptionStatus.BOUNCED, 5)
    ingest(rt, returned(rt, "gmail_over_quota.eml", sent[5], lucky))
    assert state(rt, lucky) == (SubscriptionStatus.ACTIVE, 1)
    with rt.sessions() as s:
        source = s.scalar(
            select(Event.source)
            .join(Subscriber, Subscriber.id == Event.subscriber_id)
            .where(Event.kind == "bounced", Subscriber.email == steady)
        )
    assert source == "soft-bounces"


def test_a_positive_dsn_resets_the_soft_bounce_count(rt: Runtime) -> None:
    first = seed_world(rt, confirmed=1)
    send(rt, first)
    second = next_issue(rt)
    email = "reader0@example.org"
    ingest(rt, returned(rt, "rfc3464_soft.eml", first, email))
    assert state(rt, email) == (SubscriptionStatus.ACTIVE, 1)
    delivered = returned(rt, "postfix_delayed.eml", second, email)
    delivered = delivered.replace(b"Action: delayed", b"Action: delivered")
    delivered = delivered.replace(b"Status: 4.4.1", b"Status: 2.0.0")
    assert [a.outcome for a in ingest(rt, delivered)] == [EventOutcome.RESET]
    assert state(rt, email) == (SubscriptionStatus.ACTIVE, 0)


def test_a_complaint_suppresses_every_list(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=2)
    email = "reader1@example.org"
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "science", "Science Digest", "Lab <lab@example.org>")
        subscriptions.add_subscriber(s, email, "science", confirmed=True, suppression_key=KEY)
    send(rt, issue_id)
    applied = ingest(rt, returned(rt, "arf_complaint.eml", issue_id, email))
    assert [(a.event.type, a.outcome) for a in applied] == [
        (EventType.COMPLAINT, EventOutcome.SUPPRESSED)
    ]
    assert state(rt, email, "world") == (SubscriptionStatus.COMPLAINED, 0)
    assert state(rt, email, "science") == (SubscriptionStatus.COMPLAINED, 0)
    assert state(rt, "reader0@example.org", "world") == (SubscriptionStatus.ACTIVE, 0)


def test_a_hard_bounce_suppresses_the_address_on_every_list(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=2)
    email = "reader0@example.org"
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "science", "Science Digest", "Lab <lab@example.org>")
        subscriptions.add_subscriber(s, email, "science", confirmed=True, suppression_key=KEY)
    send(rt, issue_id)
    ingest(rt, returned(rt, "exchange_ndr.eml", issue_id, email))
    assert state(rt, email, "world")[0] == SubscriptionStatus.BOUNCED
    assert state(rt, email, "science")[0] == SubscriptionStatus.BOUNCED


def test_without_verp_our_message_id_names_the_delivery_and_a_forged_one_does_not(
    rt: Runtime,
) -> None:
    issue_id = seed_world(rt, confirmed=3)
    send(rt, issue_id)
    raw = returned(rt, "rfc3464_hard.eml", issue_id, "reader0@example.org")
    applied = ingest(rt, raw, with_verp=False)
    assert applied[0].delivery_id == the_delivery(rt, issue_id, "reader0@example.org").id
    # A Message-ID whose MAC does not verify names nobody's delivery, and a report that
    # proves nothing changes nobody, whatever address it names: it is stored unverified.
    row = the_delivery(rt, issue_id, "reader1@example.org")
    assert row.message_id is not None
    mac = row.message_id.split(".", 1)[1].split("@", 1)[0]
    forged = returned(rt, "postfix_hard.eml", issue_id, "reader1@example.org").replace(
        f".{mac}@".encode(), b".0000000000000000000f@"
    )
    applied = ingest(rt, forged, with_verp=False)
    assert [(a.outcome, a.delivery_id, a.issue_id) for a in applied] == [
        (EventOutcome.UNVERIFIED, None, issue_id)
    ]
    assert state(rt, "reader1@example.org")[0] == SubscriptionStatus.ACTIVE
    # A forged VERP address is no address at all: the mangled DSN then proves nothing.
    mangled = returned(rt, "mangled_dsn.eml", issue_id, "reader2@example.org")
    genuine = verp(rt).address(the_delivery(rt, issue_id, "reader2@example.org").id)
    mangled = mangled.replace(genuine.encode(), b"bounces+1-000000000000@bounces.example.org")
    assert [a.outcome for a in ingest(rt, mangled)] == [EventOutcome.UNVERIFIED]
    assert state(rt, "reader2@example.org")[0] == SubscriptionStatus.ACTIVE


def test_mail_to_the_unsubscribe_address_unsubscribes_only_with_a_genuine_token(
    rt: Runtime,
) -> None:
    seed_world(rt, confirmed=2)
    with rt.sessions() as s:
        token = subscriptions.find_subscription(s, "reader0@example.org", "world").token
    mailto = rt.links.unsubscribe_mailto("desk@example.org", token)
    subject = mailto.split("subject=", 1)[1].replace("%20", " ")
    sample = (SAMPLES / "mailto_unsubscribe.eml").read_text()
    genuine = sample.replace(sample.split("Subject: ", 1)[1].split("\n", 1)[0], subject)
    applied = ingest(rt, genuine.encode())
    assert [(a.event.type, a.outcome) for a in applied] == [
        (EventType.UNSUBSCRIBE, EventOutcome.UNSUBSCRIBED)
    ]
    assert state(rt, "reader0@example.org")[0] == SubscriptionStatus.UNSUBSCRIBED
    # The sample's token is signed with the test key but names no subscription; a token
    # with a bad signature is refused before any lookup.
    assert [a.outcome for a in ingest(rt, sample.encode())] == [EventOutcome.UNMATCHED]
    forged = genuine.replace(subject[-6:], "AAAAAA").replace("CAFx8mQ0", "CAFx8mQ1")
    assert [a.outcome for a in ingest(rt, forged.encode())] == [EventOutcome.UNMATCHED]
    assert state(rt, "reader1@example.org")[0] == SubscriptionStatus.ACTIVE


def test_complaints_over_the_rate_pause_the_send(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=10)
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=5)
    send_batch(rt.sessions, batch_ids[0], rt.transport, rt.links, rt.policy, IssueCache())
    first = smtp_server.recorder.recipients()[0]
    applied = ingest(rt, returned(rt, "arf_complaint.eml", issue_id, first))
    assert applied[0].paused_issue
    with rt.sessions() as s:
        status = issue_status(s, issue_id)
        figures = feedback_figures.issue_feedback(s, issue_id)
    assert status["status"] == IssueStatus.PAUSED.value
    assert "complaint rate 20.00%" in status["reason"]
    assert figures["complaints"] == 1 and figures["sent"] == 5
    assert figures["complaint_rate"] == pytest.approx(0.2)
    # The paused issue's second batch is not sent.
    send_batch(rt.sessions, batch_ids[1], rt.transport, rt.links, rt.policy, IssueCache())
    assert len(smtp_server.recorder.messages) == 5


def test_one_complaint_in_a_large_send_does_not_pause_it(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=4)
    with rt.sessions() as s, s.begin():
        start_send(s, issue_id, batch_size=50)
        s.execute(  # as if 400 more had gone out already
            Delivery.__table__.update()
            .where(Delivery.issue_id == issue_id)
            .values(status=DeliveryStatus.SENT.value)
        )
    with rt.sessions() as s, s.begin():
        policy = FeedbackPolicy(complaint_pause_rate=0.3)
        assert feedback_figures.complaint_rate_exceeded(s, issue_id, policy) is None


def test_cli_ingests_files_and_issue_status_shows_the_figures(
    rt: Runtime, db_url: str, tmp_path: Path
) -> None:
    issue_id = seed_world(rt, confirmed=4)
    send(rt, issue_id)
    files = []
    for number, sample in enumerate(("postfix_hard.eml", "rfc3464_soft.eml", "auto_reply.eml")):
        path = tmp_path / sample
        path.write_bytes(returned(rt, sample, issue_id, f"reader{number}@example.org"))
        files.append(str(path))
    env = cli_env(database_url=db_url, bounce_domain=BOUNCE_DOMAIN)
    result = run_cli("bounces", "ingest", *files, "--json", env=env)
    rows = json.loads(result.stdout)
    # The webhook's shape (docs/web.md), with the file each event came from.
    assert all(set(r) == {"file", *EVENT_FIELDS} for r in rows)
    assert rows[0]["subscriber"] is not None and rows[0]["delivery"] is not None
    assert [(r["type"], r["outcome"]) for r in rows] == [
        ("hard_bounce", "suppressed"),
        ("soft_bounce", "counted"),
        ("auto_reply", "ignored"),
    ]
    text = run_cli("bounces", "ingest", files[0], env=env).stdout
    assert "hard_bounce 5.1.1 (dsn)" in text and "duplicate" in text
    status = json.loads(run_cli("issues", "status", str(issue_id), "--json", env=env).stdout)
    assert status["feedback"]["hard_bounces"] == 1
    assert status["feedback"]["soft_bounces"] == 1
    assert status["feedback"]["hard_bounce_rate"] == pytest.approx(0.25)
    human = run_cli("issues", "status", str(issue_id), env=env).stdout
    assert "hard bounces 1 (25.00%)" in human and "complaints 0" in human
    missing = run_cli("bounces", "ingest", str(tmp_path / "nope.eml"), env=env, check=False)
    assert missing.returncode == 1 and "nope.eml" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_bounce_events_model_matches_the_migration(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from newsletter.db import make_engine
    from newsletter.models import Base

    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert [d for d in diff if "bounce_events" in repr(d)] == []


def test_an_erased_reader_keeps_no_address_in_the_bounce_log(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=1)
    send(rt, issue_id)
    ingest(rt, returned(rt, "rfc3464_hard.eml", issue_id, "reader0@example.org"))
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(
            s, "reader0@example.org", suppression_key=KEY, source="operator"
        )
    with rt.sessions() as s:
        rows = s.scalars(select(BounceEvent)).all()
        assert len(rows) == 1 and rows[0].subscription_id is None
        assert "reader0" not in (rows[0].detail or "") and "<address>" in (rows[0].detail or "")
        assert s.scalar(select(func.count()).select_from(Subscription)) == 0
