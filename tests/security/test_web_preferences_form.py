"""Issue 13, finding 9: an empty or garbage POST to /preferences/{token} cleared the reader's
name and un-paused them. Only a complete, valid form changes preferences; anything else gets
a clear 400 page and changes nothing."""

from __future__ import annotations

import pytest

from newsletter import subscriptions
from newsletter.runtime import Runtime
from newsletter.tokens import Purpose
from tests.security import _web
from tests.web.helpers import Served, compose_draft, make_list, snapshot, subscription_of

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures

ADDRESS = "ada@example.org"


def _paused_reader(rt: Runtime, *, sections: bool) -> str:
    make_list(rt)
    if sections:
        compose_draft(rt)
    with rt.sessions() as s, s.begin():
        sub = subscriptions.add_subscriber(
            s, ADDRESS, "world", name="Ada", confirmed=True, suppression_key="k"
        )
        subscriptions.set_preferences(s, sub, name="Ada", sections=None, paused=True, source="t")
        return f"/preferences/{rt.links.signer.sign(Purpose.PREFERENCES, sub.token)}"


BAD_FORMS: dict[str, object] = {
    "empty body": None,
    "empty form": {},
    "garbage field": {"foo": "bar"},
    "only pause off": {"paused": "0"},
    "paused garbage": {"name": "Ada", "paused": "yes", "sections_shown": "1"},
    "unknown section": {"name": "Ada", "sections_shown": "1", "sections": ["Nowhere"]},
    "sections not shown": {"name": "Ada"},
    "name with CR/LF": {"name": "Ada\r\nBcc: x@example.org", "sections_shown": "1"},
}


@pytest.mark.parametrize("why", list(BAD_FORMS))
def test_an_incomplete_or_invalid_form_changes_nothing(
    web_rt: Runtime, web_app: Served, why: str
) -> None:
    path = _paused_reader(web_rt, sections=True)
    before = snapshot(web_rt)
    form = BAD_FORMS[why]
    answer = web_app.client.post(path, data=form)  # type: ignore[arg-type]
    assert answer.status_code in (400, 422), (why, answer.status_code)
    assert answer.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in answer.text, why
    assert snapshot(web_rt) == before, why
    sub = subscription_of(web_rt, ADDRESS)
    assert sub.paused


def test_garbage_on_a_list_without_sections_changes_nothing(
    web_rt: Runtime, web_app: Served
) -> None:
    path = _paused_reader(web_rt, sections=False)
    before = snapshot(web_rt)
    for form in (None, {}, {"x": "1"}, {"name": "Ada", "paused": "on"}):
        answer = web_app.client.post(path) if form is None else web_app.client.post(path, data=form)
        assert answer.status_code in (400, 422), form
    assert snapshot(web_rt) == before


def test_the_complete_form_still_saves(web_rt: Runtime, web_app: Served) -> None:
    path = _paused_reader(web_rt, sections=True)
    page = web_app.client.get(path)
    assert 'name="name"' in page.text and 'name="sections_shown"' in page.text
    saved = web_app.client.post(
        path, data={"name": "Ada L.", "sections_shown": "1", "sections": ["World"]}
    )
    assert saved.status_code == 200 and "Your preferences are saved." in saved.text
    sub = subscription_of(web_rt, ADDRESS)
    assert not sub.paused  # the box was not ticked: the reader un-paused on purpose
