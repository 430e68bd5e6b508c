"""Migration 0010: issues composed with the fixed markers get a key, and their stored
bodies the keyed markers, so they still send (and the downgrade puts them back)."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from sqlalchemy import text

from newsletter.db import alembic_config, make_engine, upgrade

FIXED_HTML = '<p>Hello XXNLNAMEXX,</p><a href="XXNLPREFSXX">p</a><a href="XXNLUNSUBXX">u</a>'
FIXED_TEXT = "Hello XXNLNAMEXX,\nManage preferences: XXNLPREFSXX\nUnsubscribe: XXNLUNSUBXX\n"


def test_issues_composed_before_get_a_key_and_keyed_markers(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        command.downgrade(alembic_config(engine), "0009")
        try:
            with engine.begin() as conn:
                now = datetime.now(UTC)
                conn.execute(
                    text(
                        "INSERT INTO lists (id, slug, name, from_address, created_at) "
                        "VALUES (1, 'world', 'World', 'desk@example.org', :now)"
                    ),
                    {"now": now},
                )
                for issue_id in (1, 2):
                    conn.execute(
                        text(
                            "INSERT INTO issues (id, list_id, subject, status, html, text, "
                            "nonce, created_at, consecutive_failures) VALUES (:i, 1, 'S', "
                            "'draft', :h, :t, 'abc', :now, 0)"
                        ),
                        {"i": issue_id, "h": FIXED_HTML, "t": FIXED_TEXT, "now": now},
                    )
                conn.execute(
                    text(
                        "INSERT INTO issue_variants (issue_id, sections_key, article_count, "
                        "html, text) VALUES (1, '[\"World\"]', 1, :h, :t)"
                    ),
                    {"h": FIXED_HTML, "t": FIXED_TEXT},
                )
        finally:
            upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, marker_key, html, text FROM issues")).all()
            variant = conn.execute(text("SELECT html, text FROM issue_variants")).one()
        keys = {row.marker_key for row in rows}
        assert len(keys) == 2 and all(len(k) == 20 for k in keys)
        for row in rows:
            key = row.marker_key
            assert row.html == FIXED_HTML.replace("XXNLNAMEXX", f"XXNLNAME{key}XX").replace(
                "XXNLPREFSXX", f"XXNLPREFS{key}XX"
            ).replace("XXNLUNSUBXX", f"XXNLUNSUB{key}XX")
            assert f"Unsubscribe: XXNLUNSUB{key}XX" in row.text
        first = next(row for row in rows if row.id == 1)
        assert variant.html == first.html and variant.text == first.text

        command.downgrade(alembic_config(engine), "0009")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT html, text FROM issues WHERE id = 1")).one() == (
                FIXED_HTML,
                FIXED_TEXT,
            )
            assert conn.execute(text("SELECT html FROM issue_variants")).scalar() == FIXED_HTML
        upgrade(engine)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM issue_variants"))
            conn.execute(text("DELETE FROM issues"))
            conn.execute(text("DELETE FROM lists"))
        engine.dispose()
