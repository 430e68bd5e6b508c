"""Issue 13, finding 9: a link token verifies only in the exact form we signed.

base64 decoding ignores padding and characters outside its alphabet, so `TOKEN=` or
`TOKEN!!!!` used to carry the same signature as TOKEN: the altered link still unsubscribed
the reader. Every altered form must get the "not valid" page and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from newsletter import subscriptions
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.tokens import Purpose
from newsletter.web.app import create_app

JUNK = ("=", "==", "!!!!", "%3D", "~~~~", ".", "A")


@pytest.fixture
def rt(pg_url: str, make_runtime: Callable[..., Runtime], tmp_path: Path) -> Runtime:
    return make_runtime(pg_url, outbox_dir=tmp_path / "outbox")


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(rt), base_url="https://news.example.org") as client:
        yield client


def _reader(rt: Runtime) -> str:
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        sub = subscriptions.add_subscriber(
            s, "ada@example.org", "world", name="Ada", confirmed=True, suppression_key="k"
        )
        return sub.token


def _status(rt: Runtime) -> SubscriptionStatus:
    with rt.sessions() as s:
        return subscriptions.find_subscription(s, "ada@example.org", "world").status


@pytest.mark.parametrize("junk", JUNK)
def test_an_unsubscribe_link_with_junk_appended_is_refused(
    rt: Runtime, client: TestClient, junk: str
) -> None:
    signed = rt.links.signer.sign(Purpose.UNSUBSCRIBE, _reader(rt))
    altered = f"/unsubscribe/{signed}{junk}"
    page = client.get(altered)
    assert page.status_code == 400, f"GET {altered} answered {page.status_code}"
    assert "not valid" in page.text
    one_click = client.post(
        altered,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert one_click.status_code == 400, f"POST {altered} answered {one_click.status_code}"
    assert _status(rt) is SubscriptionStatus.ACTIVE
    # the exact link still works
    assert client.get(f"/unsubscribe/{signed}").status_code == 200


@pytest.mark.parametrize("junk", ("=", "!!!!"))
def test_a_preferences_link_with_junk_appended_is_refused(
    rt: Runtime, client: TestClient, junk: str
) -> None:
    signed = rt.links.signer.sign(Purpose.PREFERENCES, _reader(rt))
    assert client.get(f"/preferences/{signed}{junk}").status_code == 400
    assert client.get(f"/preferences/{signed}").status_code == 200
