"""The operator API over HTTP: bearer token, JSON errors with the right status, and every
operation an operator needs, against PostgreSQL and a real SMTP server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from newsletter.ledger.freeze import start_send
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.suppression import SUPPRESSED_ROW
from tests.conftest import SmtpServer, cli_env, run_cli
from tests.web.conftest import ADMIN_TOKEN
from tests.web.helpers import Served, events_of, make_list, settle, subscription_of, wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ARTICLES = [
    {"section": "World", "title": "Talks resume", "body": "Negotiators met again. They talked."},
    {"section": "Asia", "title": "Monsoon arrives", "body": "Rain came early. Farmers cheered."},
]


def api(
    web: Served, method: str, path: str, content_type: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    return web.client.request(method, f"/api{path}", headers=headers, **kwargs)


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    return str(body["error"])


def test_the_api_refuses_a_missing_or_wrong_token(web: Served) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
    ):
        for method, path in (("GET", "/api/lists"), ("POST", "/api/issues/1/send")):
            refused = web.client.request(method, path, headers=headers)
            assert refused.status_code == 401, headers
            assert "bearer token" in error_of(refused)
            assert refused.headers["www-authenticate"].startswith("Bearer")
    assert api(web, "GET", "/lists").status_code == 200


def test_the_api_is_off_without_an_admin_token(
    pg_url: str, make_runtime: Callable[..., Runtime], start_app: Callable[..., Served]
) -> None:
    web = start_app(make_runtime(pg_url, admin_token=""))
    for headers in ({}, {"Authorization": "Bearer anything"}):
        off = web.client.get("/api/lists", headers=headers)
        assert off.status_code == 403
        assert "NEWSLETTER_ADMIN_TOKEN" in error_of(off)


def test_openapi_documents_the_api(web: Served) -> None:
    assert web.client.get("/docs").status_code == 200
    paths = web.client.get("/openapi.json").json()["paths"]
    for path in ("/api/lists", "/api/issues/{issue_id}/send", "/api/subscribers/erase"):
        assert path in paths


def test_lists_and_their_errors(web: Served) -> None:
    body = {"slug": "world", "name": "World Digest", "from_address": "Desk <desk@example.org>"}
    created = api(web, "POST", "/lists", json=body)
    assert created.status_code == 201 and created.json()["slug"] == "world"
    assert api(web, "POST", "/lists", json=body).status_code == 409
    bad_slug = api(web, "POST", "/lists", json={**body, "slug": "Not A Slug"})
    assert bad_slug.status_code == 422 and "invalid list slug" in error_of(bad_slug)
    missing = api(web, "POST", "/lists", json={"slug": "x"})
    assert missing.status_code == 422 and "name: Field required" in error_of(missing)
    broken = api(
        web,
        "POST",
        "/lists",
        content=b'{"slug": ',
        content_type="application/json",
    )
    assert broken.status_code == 400 and "not valid JSON" in error_of(broken)
    [world] = api(web, "GET", "/lists").json()
    assert world["name"] == "World Digest" and world["counts"] == {}
    assert api(web, "GET", "/no/such/route").status_code == 404


def test_subscribers_add_import_page_unsubscribe_erase(
    rt: Runtime, web: Served, pg_url: str, tmp_path: Path
) -> None:
    make_list(rt)
    added = api(web, "POST", "/lists/world/subscribers", json={"email": "Ada@Example.ORG"})
    assert added.status_code == 201
    assert added.json() == {
        "email": "Ada@example.org",
        "list": "world",
        "status": "pending",
        "confirmation_sent": False,
    }
    assert api(web, "POST", "/lists/nope/subscribers", json={"email": "a@b.org"}).status_code == 404
    invalid = api(web, "POST", "/lists/world/subscribers", json={"email": "not an address"})
    assert invalid.status_code == 422 and "invalid email address" in error_of(invalid)

    csv = (
        "email,name\n"
        + "".join(f"r{i}@example.org,Reader {i}\n" for i in range(5))
        + "broken,Nobody\nr1@example.org,Twice\n"
    ).encode()
    imported = api(
        web,
        "POST",
        "/lists/world/subscribers/import?confirmed=true",
        content=csv,
        content_type="text/csv",
    )
    assert imported.status_code == 200
    report = imported.json()
    # The CLI's report for the same file on a twin list is the same.
    with rt.sessions() as s, s.begin():
        from newsletter import subscriptions

        subscriptions.create_list(s, "twin", "Twin", "Desk <desk@example.org>")
    (tmp_path / "same.csv").write_bytes(csv)
    cli = run_cli(
        "subscribers",
        "import",
        str(tmp_path / "same.csv"),
        "--list",
        "twin",
        "--confirmed",
        "--json",
        env=cli_env(database_url=pg_url),
    )
    cli_report = json.loads(cli.stdout)
    for rejected in (report["rejected"], cli_report["rejected"]):
        for row in rejected:
            row["reason"] = row["reason"].replace(str(tmp_path / "same.csv"), "FILE")
    assert {k: v for k, v in report.items() if k != "summary"} == cli_report
    assert report["imported"] == 5 and [r["line"] for r in report["rejected"]] == [7, 8]
    assert report["summary"] == "imported 5, updated 0, unchanged 0, rejected 2"

    not_utf8 = api(web, "POST", "/lists/world/subscribers/import", content=b"email\n\xff@x\n")
    assert not_utf8.status_code == 422 and "not UTF-8" in error_of(not_utf8)
    strict = api(
        web,
        "POST",
        "/lists/world/subscribers/import?strict=true",
        content=b"email\nnew@example.org\nbad\n",
    )
    assert strict.status_code == 422 and "nothing imported" in error_of(strict)

    first = api(web, "GET", "/lists/world/subscribers?limit=4").json()
    assert [i["email"] for i in first["items"]] == ["Ada@example.org"] + [
        f"r{i}@example.org" for i in range(3)
    ]
    rest = api(web, "GET", f"/lists/world/subscribers?limit=4&after={first['next_after']}")
    assert [i["email"] for i in rest.json()["items"]] == ["r3@example.org", "r4@example.org"]
    assert rest.json()["next_after"] is None
    active = api(web, "GET", "/lists/world/subscribers?status=active").json()["items"]
    assert len(active) == 5
    assert api(web, "GET", "/lists/world/subscribers?status=nonsense").status_code == 422

    gone = api(
        web, "POST", "/lists/world/subscribers/unsubscribe", json={"email": "r0@example.org"}
    )
    assert gone.json()["changed"] is True
    again = api(
        web, "POST", "/lists/world/subscribers/unsubscribe", json={"email": "r0@example.org"}
    )
    assert again.json()["changed"] is False
    assert subscription_of(rt, "r0@example.org").status == SubscriptionStatus.UNSUBSCRIBED
    assert events_of(rt, "r0@example.org")[-1] == ("unsubscribed", "operator")

    erased = api(web, "POST", "/subscribers/erase", json={"email": "r2@example.org"})
    assert erased.status_code == 200 and erased.json()["erased_subscriptions"] == 2
    assert (
        api(web, "POST", "/subscribers/erase", json={"email": "r2@example.org"}).status_code == 404
    )
    back = api(web, "POST", "/lists/world/subscribers/import", content=b"email\nr2@example.org\n")
    assert back.json()["rejected"] == [{"line": 2, "reason": SUPPRESSED_ROW}]
    refused = api(web, "POST", "/lists/world/subscribers", json={"email": "r2@example.org"})
    assert refused.status_code == 409


def test_add_can_send_the_confirmation(rt: Runtime, web: Served, smtp_server: SmtpServer) -> None:
    make_list(rt)
    added = api(
        web,
        "POST",
        "/lists/world/subscribers",
        json={"email": "pat@example.org", "send_confirmation": True},
    )
    assert added.json()["confirmation_sent"] is True
    [mail] = wait_for(smtp_server.recorder, 1)
    assert mail["Subject"] == "Confirm your subscription to World Digest"


def test_articles_issues_preview_test_send_and_status(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt, articles=0)
    api(
        web,
        "POST",
        "/lists/world/subscribers/import?confirmed=true",
        content=b"email,name\nada@example.org,Ada\nbob@example.org,Bob\n",
    )
    ingested = api(web, "POST", "/articles", json=ARTICLES)
    assert ingested.json() == {"added": 2, "unchanged": 0}
    assert api(web, "POST", "/articles", json=ARTICLES).json() == {"added": 0, "unchanged": 2}
    no_title = api(web, "POST", "/articles", json=[{"section": "World", "body": "x"}])
    assert no_title.status_code == 422 and "missing 'title'" in error_of(no_title)
    broken = api(
        web,
        "POST",
        "/articles",
        content=b"[{",
        content_type="application/json",
    )
    assert broken.status_code == 400

    composed = api(web, "POST", "/issues", json={"list": "world", "subject": "Week 1"})
    assert composed.status_code == 201
    issue_id = composed.json()["id"]
    nothing_new = api(web, "POST", "/issues", json={"list": "world"})
    assert nothing_new.status_code == 422 and "no new articles" in error_of(nothing_new)
    assert api(web, "POST", "/issues", json={"list": "nope"}).status_code == 404
    assert [i["id"] for i in api(web, "GET", "/issues?list=world").json()] == [issue_id]

    preview = api(web, "GET", f"/issues/{issue_id}/preview").json()
    assert preview["subject"] == "Week 1"
    # built for the sample reader, never for a real one (issue 13, finding 9)
    assert "Hello Sample Reader," in preview["text"] and "Talks resume" in preview["html"]
    assert "Ada" not in preview["text"]
    assert settle(smtp_server.recorder) == 0  # a preview sends nothing

    tested = api(web, "POST", f"/issues/{issue_id}/test", json={"email": "editor@example.org"})
    assert tested.status_code == 200 and tested.json()["sent"] is True
    [test_copy] = wait_for(smtp_server.recorder, 1)
    assert test_copy["Subject"] == "[TEST] Week 1" and test_copy["To"] == "editor@example.org"
    assert api(web, "GET", f"/issues/{issue_id}").json()["status"] == "draft"

    started = api(web, "POST", f"/issues/{issue_id}/send")
    assert started.status_code == 202
    assert started.json() == {
        "id": issue_id,
        "recipients": 2,
        "batches": 1,
        "delivery": "in-process",
    }
    status = wait_status(web, issue_id, "sent")
    assert status["counts"]["sent"] == 2 and status["total"] == 2
    assert sorted(smtp_server.recorder.recipients()) == [
        "ada@example.org",
        "bob@example.org",
        "editor@example.org",
    ]
    again = api(web, "POST", f"/issues/{issue_id}/send")
    assert again.status_code == 409 and "only a draft can be sent" in error_of(again)
    for action in ("pause", "resume", "cancel"):
        assert api(web, "POST", f"/issues/{issue_id}/{action}").status_code == 409, action
    assert api(web, "GET", "/issues/999").status_code == 404
    assert api(web, "GET", "/issues/abc").status_code == 404  # an id that cannot exist


def wait_status(web: Served, issue_id: int, wanted: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status: dict[str, Any] = api(web, "GET", f"/issues/{issue_id}").json()
        if status["status"] == wanted:
            return status
        time.sleep(0.1)
    raise AssertionError(f"issue {issue_id} is {status['status']}, not {wanted}")


def test_pause_resume_and_cancel(rt: Runtime, web: Served, smtp_server: SmtpServer) -> None:
    make_list(rt, articles=2)
    api(
        web,
        "POST",
        "/lists/world/subscribers/import?confirmed=true",
        content=("email\n" + "".join(f"r{i}@example.org\n" for i in range(6))).encode(),
    )
    issue_id = api(web, "POST", "/issues", json={"list": "world"}).json()["id"]
    # Freeze the audience as a send does, but let nobody deliver yet.
    with rt.sessions() as s, s.begin():
        start_send(s, issue_id, batch_size=3)
    paused = api(web, "POST", f"/issues/{issue_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api(web, "POST", f"/issues/{issue_id}/pause").status_code == 409
    resumed = api(web, "POST", f"/issues/{issue_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["batches"] == 2
    assert wait_status(web, issue_id, "sent")["counts"]["sent"] == 6
    assert len(smtp_server.recorder.recipients()) == 6

    draft = api(web, "POST", "/issues", json={"list": "world", "since": "1970-01-01"}).json()
    cancelled = api(web, "POST", f"/issues/{draft['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api(web, "POST", f"/issues/{draft['id']}/send").status_code == 409


@pytest.mark.parametrize("path", ["/api/lists", "/api/issues"])
def test_api_errors_are_json_even_for_unknown_methods(web: Served, path: str) -> None:
    response = web.client.delete(path, headers=AUTH)
    assert response.status_code == 405 and error_of(response)
