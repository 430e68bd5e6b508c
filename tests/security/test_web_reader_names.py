"""Issue 13, finding 9: the subscribe form let a stranger choose a reader's display name (the
first name typed won, then it was in the greeting and the To header of every issue). A name
is set only by the reader through a confirmed link (the confirm page, preferences), never by
a form or API submission about an existing reader, and a confirmation adopts no name that a
stranger typed."""

from __future__ import annotations

from urllib.parse import urlsplit

from sqlalchemy import select

from newsletter import subscriptions
from newsletter.models import Subscriber
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.security import _web
from tests.web.helpers import (
    Served,
    body_html,
    body_text,
    link_in,
    make_list,
    send_next_issue,
    settle,
    wait_for,
)

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures
AUTH = {"Authorization": f"Bearer {_web.ADMIN_TOKEN}"}
VICTIM = "ada@example.org"


def _path(url: str) -> str:
    return urlsplit(url).path


def _name_of(rt: Runtime, address: str) -> str | None:
    with rt.sessions() as s:
        return s.scalar(select(Subscriber.name).where(Subscriber.email == address))


def _digest_to(rt: Runtime, smtp_server: SmtpServer, address: str) -> tuple[str, str, str]:
    before = settle(smtp_server.recorder)
    send_next_issue(rt, reuse_articles=True)
    messages = wait_for(smtp_server.recorder, before + 1)
    [digest] = [m for m in messages[before:] if m["To"].addresses[0].addr_spec == address]
    return str(digest["To"]), body_text(digest), body_html(digest)


def test_a_strangers_name_on_the_form_never_reaches_the_reader(
    web_rt: Runtime, web_app: Served, smtp_server: SmtpServer
) -> None:
    make_list(web_rt)
    # The stranger is first: the address is new, the name is theirs.
    web_app.client.post("/subscribe/world", data={"email": VICTIM, "name": "Mallory"})
    [confirmation] = wait_for(smtp_server.recorder, 1)
    # The reader subscribes too, with their own name, and confirms by the emailed link.
    web_app.client.post("/subscribe/world", data={"email": VICTIM, "name": "Ada"})
    assert web_app.client.post(_path(link_in(confirmation, "confirm"))).status_code == 200

    to, text, html = _digest_to(web_rt, smtp_server, VICTIM)
    assert "Mallory" not in to and "Mallory" not in text and "Mallory" not in html
    assert _name_of(web_rt, VICTIM) != "Mallory"


def test_a_form_or_api_submission_never_renames_an_existing_reader(
    web_rt: Runtime, web_app: Served, smtp_server: SmtpServer
) -> None:
    make_list(web_rt)
    with web_rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "local", "Local", "Desk <desk@example.org>")
        subscriptions.add_subscriber(s, VICTIM, "world", confirmed=True, suppression_key="k")
        subscriptions.add_subscriber(
            s, "bea@example.org", "world", name="Bea", confirmed=True, suppression_key="k"
        )
    for who in (VICTIM, "bea@example.org"):
        for slug in ("world", "local"):
            web_app.client.post(f"/subscribe/{slug}", data={"email": who, "name": "Mallory"})
            web_app.client.post(
                f"/api/lists/{slug}/subscribers",
                json={"email": who, "name": "Mallory"},
                headers=AUTH,
            )
    assert _name_of(web_rt, VICTIM) is None
    assert _name_of(web_rt, "bea@example.org") == "Bea"
    to, text, _html = _digest_to(web_rt, smtp_server, VICTIM)
    assert "Mallory" not in to and "Mallory" not in text


def test_the_reader_names_themselves_on_the_confirm_page(
    web_rt: Runtime, web_app: Served, smtp_server: SmtpServer
) -> None:
    make_list(web_rt)
    web_app.client.post("/subscribe/world", data={"email": VICTIM})
    [confirmation] = wait_for(smtp_server.recorder, 1)
    link = _path(link_in(confirmation, "confirm"))
    page = web_app.client.get(link)
    assert 'name="name"' in page.text
    bad = web_app.client.post(link, data={"name": "Ada\r\nBcc: x@example.org"})
    assert bad.status_code == 400 and _name_of(web_rt, VICTIM) is None
    done = web_app.client.post(link, data={"name": "Ada"})
    assert done.status_code == 200 and "You are subscribed" in done.text
    to, text, _html = _digest_to(web_rt, smtp_server, VICTIM)
    assert "Hello Ada," in text and "Ada" in to
