"""The public subscribe form: double opt-in, no enumeration, no list bombing."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis
from sqlalchemy import select

from newsletter import subscriptions
from newsletter.models import Subscriber, SubscriptionStatus, sections_key
from newsletter.runtime import Runtime
from newsletter.web.limits import RedisLimiter, SubscribeLimits
from tests.conftest import SmtpServer
from tests.web.helpers import (
    Served,
    compose_draft,
    make_list,
    settle,
    snapshot,
    subscription_of,
    wait_for,
)


def existing_readers(rt: Runtime) -> None:
    with rt.sessions() as s, s.begin():
        for address, confirmed in (("active@example.org", True), ("pending@example.org", False)):
            subscriptions.add_subscriber(
                s, address, "world", name="Known", confirmed=confirmed, suppression_key="k"
            )
        subscriptions.add_subscriber(
            s, "left@example.org", "world", confirmed=True, suppression_key="k"
        )
        subscriptions.unsubscribe(s, "left@example.org", "world", source="page")
        subscriptions.add_subscriber(s, "erased@example.org", "world", suppression_key="k")
        subscriptions.erase_subscriber(
            s, "erased@example.org", suppression_key=rt.suppression_key, source="operator"
        )


def _visible(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "date"]
    return response.status_code, response.content, headers


def test_the_form_answers_identically_whoever_the_address_is(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    existing_readers(rt)
    answers = {
        address: _visible(
            web.client.post("/subscribe/world", data={"email": address, "name": "Eve"})
        )
        for address in (
            "new@example.org",
            "pending@example.org",
            "active@example.org",
            "left@example.org",
            "erased@example.org",
        )
    }
    answers["a bot"] = _visible(
        web.client.post(
            "/subscribe/world", data={"email": "bot@example.org", "website": "http://spam"}
        )
    )
    first = answers["new@example.org"]
    assert first[0] == 200 and b"Check your inbox" in first[1]
    for who, answer in answers.items():
        assert answer == first, f"the answer for {who} differs"

    settle(smtp_server.recorder)
    # Confirmations go to whoever can still join, and never to an active or bot address. An
    # erased address gets one: confirming it is the new consent that lets it back in.
    assert sorted(smtp_server.recorder.recipients()) == [
        "erased@example.org",
        "left@example.org",
        "new@example.org",
        "pending@example.org",
    ]
    assert subscription_of(rt, "left@example.org").status == SubscriptionStatus.UNSUBSCRIBED
    assert subscription_of(rt, "active@example.org").status == SubscriptionStatus.ACTIVE
    with rt.sessions() as s:  # a stranger's form cannot rename an existing reader
        names = dict(s.execute(select(Subscriber.email, Subscriber.name)).all())
    assert names["active@example.org"] == names["pending@example.org"] == "Known"
    assert names["new@example.org"] is None  # the reader names themselves when confirming
    assert "bot@example.org" not in names


def test_the_confirmation_link_works_and_the_chosen_sections_are_kept(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    compose_draft(rt)
    form = web.client.get("/subscribe/world")
    assert 'value="Asia" checked' in form.text
    web.client.post(
        "/subscribe/world",
        data={"email": "zoe@example.org", "name": "Zoë", "sections": ["Asia", "Climate"]},
    )
    [mail] = wait_for(smtp_server.recorder, 1)
    assert mail["To"] == "zoe@example.org" and "Zoë" not in str(mail["To"])
    sub = subscription_of(rt, "zoe@example.org")
    assert sub.status == SubscriptionStatus.PENDING
    assert sub.sections == sections_key(["Asia", "Climate"])


def test_a_bad_address_gets_the_form_back_with_the_reason(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    before = snapshot(rt)
    page = web.client.post(
        "/subscribe/world", data={"email": "<b>not-an-address", "name": "<i>Eve</i>"}
    )
    assert page.status_code == 400
    assert "Invalid email address" in page.text
    assert "<b>" not in page.text and "&lt;b&gt;not-an-address" in page.text
    assert "<i>" not in page.text  # the form takes no name (the confirm page does)
    assert snapshot(rt) == before
    assert settle(smtp_server.recorder) == 0


def test_an_unknown_list_is_a_404_page(rt: Runtime, web: Served) -> None:
    for response in (
        web.client.get("/subscribe/nope"),
        web.client.post("/subscribe/nope", data={"email": "a@example.org"}),
    ):
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "Unknown list &#39;nope&#39;." in response.text


def test_a_flood_for_one_address_sends_one_confirmation(
    rt: Runtime, redis_url: str, smtp_server: SmtpServer, start_app: Callable[..., Served]
) -> None:
    make_list(rt)
    web = start_app(
        rt,
        limiter=RedisLimiter(redis.Redis.from_url(redis_url)),
        limits=SubscribeLimits(per_ip=100),
    )
    answers = {
        web.client.post("/subscribe/world", data={"email": "victim@example.org"}).content
        for _ in range(20)
    }
    assert len(answers) == 1  # every POST got the same page
    web.client.post("/subscribe/world", data={"email": "someone@example.org"})
    settle(smtp_server.recorder, quiet=1.0)
    assert sorted(smtp_server.recorder.recipients()) == [
        "someone@example.org",
        "victim@example.org",
    ]
    # The counters live in Redis, keyed without the address.
    keys = redis.Redis.from_url(redis_url).keys("newsletter:limit:*")
    assert keys and not any(b"victim" in k for k in keys)


def test_a_flood_from_one_client_is_refused(
    rt: Runtime, redis_url: str, smtp_server: SmtpServer, start_app: Callable[..., Served]
) -> None:
    make_list(rt)
    web = start_app(
        rt,
        limiter=RedisLimiter(redis.Redis.from_url(redis_url)),
        limits=SubscribeLimits(per_ip=3),
    )
    codes = [
        web.client.post("/subscribe/world", data={"email": f"r{i}@example.org"}).status_code
        for i in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    settle(smtp_server.recorder)
    assert sorted(smtp_server.recorder.recipients()) == [f"r{i}@example.org" for i in range(3)]


def test_without_redis_the_limits_hold_in_memory(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    for _ in range(5):
        web.client.post("/subscribe/world", data={"email": "again@example.org"})
    settle(smtp_server.recorder)
    assert smtp_server.recorder.recipients() == ["again@example.org"]
