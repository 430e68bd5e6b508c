"""The suppression store on SQLite and PostgreSQL: its sealed key (made once, sealed again
after a rotation, an old install's first key kept), the batch check, and lifting."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter import subscriptions, suppression
from newsletter.db import make_engine, make_sessionmaker
from newsletter.keyring import SealedKeyError, unseal
from newsletter.ledger.freeze import start_send
from newsletter.ledger.sender import run_in_process
from newsletter.models import (
    Delivery,
    DeliveryStatus,
    Event,
    KeyringEntry,
    Subscriber,
    Suppression,
)
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.integration.helpers import seed_world


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def sealed(sessions: sessionmaker[Session]) -> str:
    with sessions() as s:
        value = s.scalar(select(KeyringEntry.sealed).where(KeyringEntry.name == "suppression"))
    assert value is not None
    return value


def test_the_key_is_made_once_and_kept_across_a_rotation(sessions: sessionmaker[Session]) -> None:
    key = suppression.load_key(sessions, ["old"])
    assert len(key) == 64 and key != "old"
    assert suppression.load_key(sessions, ["old"]) == key
    assert unseal(sealed(sessions), ["old"], "suppression") == (key, False)

    assert suppression.load_key(sessions, ["new", "old"]) == key
    assert unseal(sealed(sessions), ["new"], "suppression") == (key, False)  # sealed again
    assert suppression.load_key(sessions, ["new"]) == key
    with pytest.raises(SealedKeyError):
        suppression.load_key(sessions, ["other"])


def test_an_install_with_suppressions_keeps_its_first_key(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        s.add(Suppression(email_hash=suppression.suppression_hash("a@example.org", "first"),
                          reason="erased"))  # fmt: skip
    key = suppression.load_key(sessions, ["first", "older"])
    assert key == "first"
    with sessions() as s:
        assert suppression.is_suppressed(s, "A@Example.org", key)


def test_a_batch_check_and_lifting(sessions: sessionmaker[Session]) -> None:
    key = suppression.load_key(sessions, ["k"])
    with sessions() as s, s.begin():
        suppression.suppress(s, "Gone@example.org", key, suppression.ERASED)
        suppression.suppress(s, "gone@example.org", key, suppression.ERASED)  # no-op
        suppression.suppress(s, "bounced@example.org", key, "hard_bounce")
    with sessions() as s, s.begin():
        emails = ["GONE@example.org", "bounced@example.org", "here@example.org"]
        assert suppression.suppressed_among(s, emails, key) == {
            "GONE@example.org",
            "bounced@example.org",
        }
        assert suppression.suppressed_among(s, [], key) == set()
        assert suppression.reason_for(s, "bounced@example.org", key) == "hard_bounce"
        assert suppression.lift(s, "gone@EXAMPLE.org", key) is True
        assert suppression.lift(s, "gone@example.org", key) is False
        assert suppression.suppressed_among(s, emails, key) == {"bounced@example.org"}


def test_a_claim_skips_an_address_suppressed_after_the_freeze(
    db_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]
) -> None:
    """The suppression lands between the freeze and the claim (an erase racing an import
    left the reader in place): the claim checks the hash and skips them, saying why."""
    rt = make_runtime(db_url, smtp_url=smtp_server.url)
    issue_id = seed_world(rt, confirmed=3)
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
    with rt.sessions() as s, s.begin():
        suppression.suppress(s, "READER1@example.org", rt.suppression_key, "hard_bounce")
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)

    assert sorted(smtp_server.recorder.recipients()) == [
        "reader0@example.org",
        "reader2@example.org",
    ]
    with rt.sessions() as s:
        skipped = s.scalars(
            select(Delivery.last_error).where(Delivery.status == DeliveryStatus.SKIPPED)
        ).all()
    assert skipped == ["address suppressed before send"]


def test_readers_an_old_erase_left_behind_are_erased_once_the_key_is_made(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World", "Desk <desk@example.org>")
        for address in ("Dup@example.org", "ann@example.org"):
            subscriptions.add_subscriber(s, address, "world", confirmed=True, suppression_key="x")
        s.add(Suppression(email_hash=suppression.suppression_hash("dup@example.org", "first"),
                          reason="erased"))  # fmt: skip
    suppression.load_key(sessions, ["first"])
    with sessions() as s:
        left = s.scalars(select(Subscriber.email)).all()
        kinds = s.execute(select(Event.kind, Event.source).where(Event.kind == "erased")).all()
    assert left == ["ann@example.org"]
    assert kinds == [("erased", "upgrade")]
    suppression.load_key(sessions, ["first"])  # once only: the key is there now
