"""Paging through a list's subscribers, as an operator's script does it: through the API
(`after` = the previous page's `next_after`) and through `newsletter subscribers list`.
Every subscriber of the list shows up exactly once, in order, other lists' subscribers never,
and the last page says so (no extra empty page to fetch)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from newsletter import subscriptions
from newsletter.runtime import Runtime
from tests.conftest import cli_env, run_cli
from tests.web.conftest import ADMIN_TOKEN
from tests.web.helpers import Served

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "test-secret-key"


def seed(rt: Runtime) -> dict[str, list[str]]:
    """`world` with 20 readers (every fifth of them unsubscribed later) interleaved with
    `other`'s readers, so that the two lists' subscription ids alternate. Returns each list's
    addresses by status, in subscription order."""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        subscriptions.create_list(s, "other", "Other", "Other Desk <other@example.org>")
        for i in range(20):
            for slug in ("world", "other"):
                subscriptions.add_subscriber(
                    s,
                    f"{slug}{i:02d}@example.org",
                    slug,
                    confirmed=True,
                    suppression_key=KEY,
                )
        for i in range(0, 20, 5):
            subscriptions.unsubscribe(s, f"world{i:02d}@example.org", "world", source="page")
    everyone = [f"world{i:02d}@example.org" for i in range(20)]
    return {
        "all": everyone,
        "unsubscribed": everyone[::5],
        "active": [a for i, a in enumerate(everyone) if i % 5],
    }


def walk(web: Served, query: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Every page, following next_after until it is null. Returns the items and the number
    of requests it took."""
    items: list[dict[str, Any]] = []
    after: int | None = 0
    requests = 0
    while after is not None:
        response = web.client.get(
            f"/api/lists/world/subscribers?limit={limit}&after={after}{query}", headers=AUTH
        )
        assert response.status_code == 200, response.text
        body = response.json()
        requests += 1
        assert len(body["items"]) <= limit
        if body["next_after"] is not None:
            assert body["items"], "a page that says there is more must not be empty"
            assert body["next_after"] == body["items"][-1]["id"]
        items += body["items"]
        after = body["next_after"]
        assert requests < 100, "next_after never became null"
    return items, requests


@pytest.mark.parametrize("limit", [1, 3, 5, 7, 20, 100])
def test_every_subscriber_appears_once_across_pages(rt: Runtime, web: Served, limit: int) -> None:
    expected = seed(rt)
    items, requests = walk(web, "", limit)
    assert [i["email"] for i in items] == expected["all"]
    ids = [i["id"] for i in items]
    assert ids == sorted(set(ids))
    # The last page carries next_after null: 20 readers in pages of 5 is 4 requests, not 5.
    assert requests == max(1, -(-20 // limit))


@pytest.mark.parametrize("limit", [1, 2, 4, 16])
def test_a_status_filter_pages_through_exactly_that_status(
    rt: Runtime, web: Served, limit: int
) -> None:
    expected = seed(rt)
    for status in ("unsubscribed", "active"):
        items, requests = walk(web, f"&status={status}", limit)
        assert [i["email"] for i in items] == expected[status]
        assert {i["status"] for i in items} == {status}
        assert requests == max(1, -(-len(expected[status]) // limit))
    pending, _ = walk(web, "&status=pending", limit)
    assert pending == []


def test_a_deep_page_with_a_status_filter_starts_after_the_given_id(
    rt: Runtime, web: Served
) -> None:
    expected = seed(rt)
    everyone, _ = walk(web, "", 100)
    by_email = {i["email"]: i["id"] for i in everyone}
    # Start in the middle of the list, between two unsubscribed readers.
    after = by_email["world07@example.org"]
    page = web.client.get(
        f"/api/lists/world/subscribers?status=unsubscribed&limit=1&after={after}", headers=AUTH
    ).json()
    assert [i["email"] for i in page["items"]] == ["world10@example.org"]
    assert page["next_after"] == by_email["world10@example.org"]
    rest = web.client.get(
        f"/api/lists/world/subscribers?status=unsubscribed&after={page['next_after']}",
        headers=AUTH,
    ).json()
    assert [i["email"] for i in rest["items"]] == expected["unsubscribed"][3:]
    assert rest["next_after"] is None
    # Past the last subscriber: an empty page that says it is the last.
    beyond = web.client.get(
        f"/api/lists/world/subscribers?after={max(by_email.values())}", headers=AUTH
    ).json()
    assert beyond == {"items": [], "next_after": None}


def test_the_cli_pages_the_same_way_and_streams_valid_json(rt: Runtime, pg_url: str) -> None:
    expected = seed(rt)
    env = cli_env(database_url=pg_url)
    listed: list[dict[str, Any]] = []
    after = 0
    while True:
        page = json.loads(
            run_cli(
                "subscribers",
                "list",
                "--list",
                "world",
                "--limit",
                "8",
                "--after",
                str(after),
                "--json",
                env=env,
            ).stdout
        )
        listed += page
        if len(page) < 8:
            break
        after = page[-1]["id"]
    assert [r["email"] for r in listed] == expected["all"]

    whole = run_cli(
        "subscribers", "list", "--list", "world", "--status", "unsubscribed", env=env
    ).stdout.splitlines()
    assert [line.split("\t")[1] for line in whole] == expected["unsubscribed"]
    none = run_cli(
        "subscribers", "list", "--list", "world", "--status", "pending", "--json", env=env
    )
    assert json.loads(none.stdout) == []
    unknown = run_cli("subscribers", "list", "--list", "nope", "--json", env=env, check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == "error: unknown list 'nope'"
