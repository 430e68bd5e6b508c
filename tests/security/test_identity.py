"""One identity per mailbox (issue 13, findings 3 and 4), from the outside: the CLI as an
operator runs it, the HTTP API and the public form, and what reaches the SMTP server.

Addresses compare case-insensitively (newsletter.addresses.address_key): `Dup@`, `dup@` and
`DUP@` are one reader, whom erasure finds by any capitalisation and who gets one copy."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, cli_env, free_port, run_cli
from tests.web.helpers import Served, make_list, serve, settle

ADMIN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SEED = Path(__file__).resolve().parents[1] / "data" / "seed_world.txt"


def _identity(address: str) -> str:
    return address.lower()


# --- the CLI: erase finds every capitalisation -------------------------------------------------


@pytest.fixture
def env(pg_url: str, tmp_path: Path) -> dict[str, str]:
    environment = cli_env(database_url=pg_url, outbox_dir=str(tmp_path / "outbox"))
    run_cli(
        "lists", "create", "world", "--name", "World", "--from-address", "Desk <desk@example.org>",
        env=environment,
    )  # fmt: skip
    return environment


def _listed(env: dict[str, str]) -> list[dict[str, Any]]:
    proc = run_cli("subscribers", "list", "--list", "world", "--json", env=env)
    return list(json.loads(proc.stdout))


def test_erase_finds_the_reader_stored_in_another_capitalisation(env: dict[str, str]) -> None:
    run_cli("subscribers", "add", "k7@example.org", "--list", "world", "--name", "Kay", env=env)
    proc = run_cli("subscribers", "erase", "K7@Example.org", env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert _listed(env) == []
    again = run_cli("subscribers", "add", "K7@example.org", "--list", "world", env=env, check=False)
    assert again.returncode != 0 and "erased or suppressed" in again.stderr


def test_erase_of_one_capitalisation_leaves_no_variant_and_no_copy(
    env: dict[str, str], tmp_path: Path
) -> None:
    people = tmp_path / "people.csv"
    people.write_text(
        "email,name,city\nDup@example.org,Dee,Oslo\ndup@example.org,Dup,Rome\n"
        "DUP@example.org,DUP,Lima\nother@example.org,Other,Kyiv\n"
    )
    run_cli("subscribers", "import", str(people), "--list", "world", "--confirmed", env=env)
    run_cli("subscribers", "erase", "dup@example.org", env=env)

    listed = _listed(env)
    assert [_identity(r["email"]) for r in listed] == ["other@example.org"]
    assert all(r["name"] == "Other" for r in listed)

    run_cli("articles", "ingest", str(SEED), env=env)
    issue = run_cli("issues", "compose", "--list", "world", env=env).stdout.strip()
    run_cli("issues", "send", issue, "--wait", env=env)
    outbox = Path(env["NEWSLETTER_OUTBOX_DIR"])
    sent = [p.read_text(errors="replace") for p in (outbox / "new").iterdir()]
    assert len(sent) == 1 and "other@example.org" in sent[0]
    assert "dup@example.org" not in sent[0].lower()


# --- HTTP and SMTP: one reader across import, form and API, one copy --------------------------


@pytest.fixture
def rt(pg_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    port = free_port()
    return make_runtime(
        pg_url, smtp_url=smtp_server.url, base_url=f"http://127.0.0.1:{port}", admin_token=ADMIN
    )


@pytest.fixture
def web(rt: Runtime) -> Iterator[Served]:
    port = int(rt.settings.base_url.rsplit(":", 1)[1])
    with serve(create_app(rt), port) as served:
        yield served


def _api(web: Served, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return web.client.request(method, f"/api{path}", headers=AUTH, **kwargs)


def _readers(web: Served) -> list[dict[str, Any]]:
    page = _api(web, "GET", "/lists/world/subscribers?limit=1000")
    assert page.status_code == 200, page.text
    return list(page.json()["items"])


def test_import_form_and_api_variants_are_one_reader_who_gets_one_copy(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    imported = _api(
        web,
        "POST",
        "/lists/world/subscribers/import?confirmed=true",
        content=b"email,name\nDup@example.org,Dee\ndup@example.org,Dup\nDUP@example.org,DUP\n",
    )
    assert imported.status_code == 200, imported.text
    assert imported.json()["imported"] == 1
    assert imported.json()["folded"] == 2

    # The form, in yet another capitalisation: no second reader, no confirmation mail (the
    # reader is active already), and the stranger's name does not replace the reader's.
    form = web.client.post("/subscribe/world", data={"email": "dUp@Example.org", "name": "Eve"})
    assert form.status_code == 200
    added = _api(web, "POST", "/lists/world/subscribers", json={"email": "DuP@example.org"})
    assert added.status_code == 201, added.text
    assert added.json()["status"] == "active" and added.json()["email"] == "Dup@example.org"

    readers = _readers(web)
    assert [(r["email"], r["name"], r["status"]) for r in readers] == [
        ("Dup@example.org", "Dee", "active")
    ]

    settle(smtp_server.recorder)
    smtp_server.recorder.messages.clear()
    issue = _api(web, "POST", "/issues", json={"list": "world"})
    assert issue.status_code == 201, issue.text
    sent = _api(web, "POST", f"/issues/{issue.json()['id']}/send")
    assert sent.status_code == 202 and sent.json()["recipients"] == 1, sent.text
    settle(smtp_server.recorder, quiet=1.0)
    recipients = smtp_server.recorder.recipients()
    assert [_identity(r) for r in recipients] == ["dup@example.org"]


def test_the_confirmation_limit_counts_one_identity_not_each_capitalisation(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    for typed in ("rate@example.org", "RATE@example.org", "Rate@example.org", "rAtE@example.org"):
        answer = web.client.post("/subscribe/world", data={"email": typed})
        assert answer.status_code == 200
    settle(smtp_server.recorder, quiet=1.0)
    # One confirmation per address per list per window (SubscribeLimits.per_address = 1),
    # whichever way the address was typed; and one pending reader.
    assert [_identity(r) for r in smtp_server.recorder.recipients()] == ["rate@example.org"]
    assert [_identity(r["email"]) for r in _readers(web)] == ["rate@example.org"]
