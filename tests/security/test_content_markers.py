"""Finding 1 of issue 13: nothing in content can reach a reader's personal links or name.

Every per-reader placeholder marker an attacker could know, in every case and encoding, is
fed through every field that reaches the digest templates (section, title, body, summary,
article URL, subject, list name, reader name) by the operator's own commands; the issue is
sent to the outbox for two readers. Each reader's opaque token may appear only in the
composer's own links (List-Unsubscribe, and the footer's two links in each part), and the
two messages, with each reader's own values masked, must be identical: content that turned
into one reader's link would make them differ.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import re
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote, unquote

from tests.conftest import cli_env, run_cli

LEGACY = ("XXNLNAMEXX", "XXNLUNSUBXX", "XXNLPREFSXX")


def spellings(marker: str) -> list[str]:
    """A marker as a hostile feed might spell it, so that some filter turns it back."""
    return [
        marker,
        marker.lower(),
        marker.title(),
        marker.swapcase(),
        "".join(f"%{ord(c):02X}" for c in marker),
        "".join(f"&#{ord(c)};" for c in marker),
        "".join(f"&#x{ord(c):x};" for c in marker.lower()),
        quote(f"https://evil.example/c?u={marker}"),
    ]


def every_spelling() -> list[str]:
    return [s for m in LEGACY for s in spellings(m)]


# Short fields (list name, reader name, subject) get the spellings that fit: every marker
# lower-cased (what `upper` turned into the real marker), percent-encoded and as entities.
SHORT = "xxnlunsubxx %58%58NLPREFSXX &#88;XNLNAMEXX Xxnlprefsxx xxnlnamexx"


def articles_json(path: Path) -> int:
    """One article per spelling, the spelling in every field; returns how many."""
    items = [
        {
            "section": spelling[:100],
            "title": f"Story {n} {spelling}",
            "body": f"Body {n} {spelling}. Second sentence {spelling}.",
            "url": "https://evil.example/c?u=" + spelling.replace("#", "%23").replace(" ", ""),
            **({"summary": f"Summary {n} {spelling}"} if n % 2 else {}),
        }
        for n, spelling in enumerate(every_spelling())
    ]
    items.append(
        {
            "section": "https://evil.example/c?u=xxnlunsubxx&p=xxnlprefsxx",
            "title": "The report of issue 13",
            "body": "The section is what the RSS category said.",
        }
    )
    path.write_text(json.dumps(items))
    return len(items)


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = html_part = ""
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            text = str(part.get_content())
        elif part.get_content_type() == "text/html":
            html_part = str(part.get_content())
    return text, html_part


def decoded(text: str) -> str:
    """Every spelling a mail client or browser could turn back into the same characters."""
    for _ in range(3):
        text = unquote(html.unescape(text))
    return text.lower()


def test_no_content_field_reaches_a_readers_links(pg_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    env = cli_env(database_url=pg_url, outbox_dir=str(outbox))
    markers = SHORT
    run_cli(
        "lists",
        "create",
        "world",
        "--name",
        f"World {markers}",
        "--from-address",
        "World Desk <desk@example.org>",
        env=env,
    )
    names = {"ann@example.org": f"Ann {markers}", "bob@example.org": f"Bob {markers} XXNLNAMEXX"}
    for address, name in names.items():
        run_cli(
            "subscribers", "add", address, "--list", "world", "--name", name, "--confirmed", env=env
        )
    feed = tmp_path / "evil.json"
    count = articles_json(feed)
    run_cli("articles", "ingest", str(feed), env=env)
    issue_id = run_cli(
        "issues",
        "compose",
        "--list",
        "world",
        "--max-articles",
        str(count),
        "--subject",
        f"News {markers}",
        env=env,
    ).stdout.strip()
    run_cli("issues", "send", issue_id, env=env)

    files = sorted((outbox / "new").iterdir())
    assert len(files) == 2
    masked: dict[str, tuple[str, str, str]] = {}
    for file in files:
        msg = email.message_from_bytes(file.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        reader = str(msg["Delivered-To"])
        https, mailto = re.findall(r"<([^<>]+)>", str(msg["List-Unsubscribe"]))
        signed = https.rsplit("/", 1)[1]
        token = signed.split(".")[0]
        text, html_part = parts(msg)
        preferences = re.findall(r"^Manage preferences: (\S+)", text, re.MULTILINE)[-1]
        # The reader's token: in the List-Unsubscribe URIs, and in the footer's two links
        # of each part; nowhere else, in any case or encoding.
        headers = "\n".join(f"{k}: {v}" for k, v in msg.items())
        assert decoded(headers).count(token.lower()) == 2, reader
        assert decoded(text).count(token.lower()) == 2, f"{reader} text part:\n{text}"
        assert decoded(html_part).count(token.lower()) == 2, f"{reader} html part"
        own = {
            https: "<UNSUBSCRIBE>",
            preferences: "<PREFERENCES>",
            mailto: "<MAILTO>",
        }
        shown = " ".join(names[reader].split())

        def mask(body: str, own: dict[str, str] = own, shown: str = shown) -> str:
            for value, label in own.items():
                body = body.replace(html.escape(value), label).replace(value, label)
            return body.replace(html.escape(shown), "<NAME>").replace(shown, "<NAME>")

        masked[reader] = (str(msg["Subject"]), mask(text), mask(html_part))
    ann, bob = masked["ann@example.org"], masked["bob@example.org"]
    assert ann[0] == bob[0]
    assert ann[1] == bob[1]
    assert ann[2] == bob[2]
