"""The digest and confirmation emails as a reader (and a mail client) would see them."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import jinja2
import pytest

from newsletter.compose import (
    DigestArticle,
    DigestContext,
    RenderedIssue,
    default_subject,
    inline_css,
    make_environment,
    render_confirmation,
    render_issue,
)
from newsletter.placeholders import Markers

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
ISSUE_DATE = datetime.date(2026, 11, 28)


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    return make_environment(TEMPLATES)


def article(
    title: str = "Talks resume in Geneva",
    *,
    section: str = "World",
    summary: str = "Delegations met for six hours and agreed to meet again next week.",
    url: str | None = "https://news.example.com/geneva-talks",
) -> DigestArticle:
    return DigestArticle(section=section, title=title, summary=summary, url=url)


def context(
    articles: list[DigestArticle],
    *,
    list_name: str = "World Digest",
    archive_url: str | None = "https://news.example.org/archive/world/7",
    postal_address: str = "Example News Ltd\n1 Harbour Street\nPortsmouth PO1 1AA",
) -> DigestContext:
    return DigestContext(
        markers=MARKERS,
        list_name=list_name,
        list_slug="world",
        issue_date=ISSUE_DATE,
        subject=default_subject(list_name, ISSUE_DATE, articles),
        articles=articles,
        postal_address=postal_address,
        archive_url=archive_url,
    )


def render(
    env: jinja2.Environment, articles: list[DigestArticle], **kwargs: object
) -> RenderedIssue:
    return render_issue(context(articles, **kwargs), env)  # type: ignore[arg-type]


def test_article_text_is_escaped_in_html_and_plain_in_text(env: jinja2.Environment) -> None:
    hostile = article(
        '<script>alert("x")</script> Markets & "bonds"',
        section="<b>World</b>",
        summary="Rates <img src=x onerror=alert(1)> rose & fell.",
    )
    issue = render(env, [hostile])

    assert "<script" not in issue.html
    assert "<img" not in issue.html
    assert "<b>World</b>" not in issue.html
    assert '&lt;script&gt;alert("x")&lt;/script&gt; Markets &amp; "bonds"' in issue.html
    assert "Rates &lt;img src=x onerror=alert(1)&gt; rose &amp; fell." in issue.html
    assert '<script>alert("x")</script> Markets & "bonds"' in issue.text
    assert "Rates <img src=x onerror=alert(1)> rose & fell." in issue.text


def test_titles_link_to_http_articles_only(env: jinja2.Environment) -> None:
    linked = article("Linked story", url="https://news.example.com/a?id=1&ref=mail")
    unsafe = article("Script story", url="javascript:alert(1)")
    data = article("Data story", url="data:text/html,<b>x</b>")
    unlinked = article("Plain story", url=None)
    issue = render(env, [linked, unsafe, data, unlinked])

    assert re.search(
        r'<a [^>]*href="https://news\.example\.com/a\?id=1&amp;ref=mail"[^>]*>Linked story</a>',
        issue.html,
    )
    assert "javascript:" not in issue.html
    assert "data:text" not in issue.html
    for title in ("Script story", "Data story", "Plain story"):
        assert not re.search(rf'<a [^>]*href="(?!#)[^"]*"[^>]*>{title}</a>', issue.html)
        assert f"\n{title}\n" in issue.html  # still shown, as plain text
    assert "Read the full article: https://news.example.com/a?id=1&ref=mail" in issue.text
    assert "javascript:" not in issue.text


def test_contents_list_links_to_each_card(env: jinja2.Environment) -> None:
    issue = render(env, [article("First"), article("Second"), article("Third")])

    for number, title in enumerate(("First", "Second", "Third"), start=1):
        assert re.search(rf'<a [^>]*href="#article-{number}"[^>]*>{title}</a>', issue.html)
        assert f'id="article-{number}"' in issue.html
        assert f"{number}. {title}" in issue.text


def test_header_shows_list_name_date_and_browser_link(env: jinja2.Environment) -> None:
    issue = render(env, [article()])

    assert "World Digest" in issue.html
    assert "28 November 2026" in issue.html
    assert re.search(
        r'<a [^>]*href="https://news\.example\.org/archive/world/7"[^>]*>View in your browser</a>',
        issue.html,
    )
    assert issue.text.startswith("World Digest\n28 November 2026\n")
    assert "View in your browser: https://news.example.org/archive/world/7" in issue.text


def test_browser_link_is_left_out_without_archive_url(env: jinja2.Environment) -> None:
    issue = render(env, [article()], archive_url=None)

    assert "View in your browser" not in issue.html
    assert "View in your browser" not in issue.text


def test_footer_explains_and_offers_preferences_and_unsubscribe(env: jinja2.Environment) -> None:
    issue = render(env, [article()])

    assert "You are receiving this because you subscribed to World Digest." in issue.html
    assert "You are receiving this because you subscribed to World Digest." in issue.text
    assert "Example News Ltd<br>" in issue.html
    assert "1 Harbour Street<br>" in issue.html
    assert "Portsmouth PO1 1AA" in issue.html
    assert "Example News Ltd\n1 Harbour Street\nPortsmouth PO1 1AA\n" in issue.text
    assert re.search(
        rf'<a [^>]*href="{MARKERS.preferences_url}"[^>]*>Manage preferences</a>', issue.html
    )
    assert re.search(rf'<a [^>]*href="{MARKERS.unsubscribe_url}"[^>]*>Unsubscribe</a>', issue.html)
    assert f"Manage preferences: {MARKERS.preferences_url}\n" in issue.text
    assert f"Unsubscribe: {MARKERS.unsubscribe_url}\n" in issue.text


def test_placeholders_survive_premailer_byte_for_byte(env: jinja2.Environment) -> None:
    issue = render(env, [article()])

    for marker in MARKERS.all:
        assert marker in issue.html
        assert marker in issue.text
    assert f"Hello {MARKERS.name}," in issue.html
    assert f"Hello {MARKERS.name}," in issue.text


def test_content_spelling_a_marker_of_another_issue_stays_text(env: jinja2.Environment) -> None:
    other = Markers("fedcba9876543210fedc")
    sneaky = article(
        f"Win {other.unsubscribe_url} XXNLUNSUBXX",
        section="xxnlunsubxx",
        summary=f"Hi XXNL{other.name}NAMEXX there",
        url=f"https://evil.example/collect?u={other.unsubscribe_url}",
    )
    issue = render(env, [sneaky])

    assert issue.html.count(MARKERS.unsubscribe_url) == 1  # the footer link only
    assert issue.text.count(MARKERS.unsubscribe_url) == 1
    assert issue.html.count(MARKERS.name) == 1  # the greeting only
    assert issue.text.count(MARKERS.name) == 1


@pytest.mark.parametrize(
    "field", ["section", "title", "summary", "url", "list_name", "postal_address"]
)
@pytest.mark.parametrize(
    "spelling",
    [
        MARKERS.unsubscribe_url,
        MARKERS.key.upper(),
        "".join(f"%{ord(c):02X}" for c in MARKERS.key),
        "".join(f"&#{ord(c)};" for c in MARKERS.key),
        " ".join(MARKERS.key),
    ],
)
def test_content_holding_the_issues_own_key_is_refused(
    env: jinja2.Environment, field: str, spelling: str
) -> None:
    values = {"section": "World", "title": "Talks", "summary": "Text.", "url": None}
    kwargs: dict[str, str] = {}
    if field in values:
        values[field] = f"https://evil.example/c?u={spelling}" if field == "url" else spelling
    else:
        kwargs[field] = f"News {spelling}"
    sneaky = DigestArticle(**values)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="marker key"):
        render(env, [sneaky], **kwargs)


def test_css_is_inlined_and_media_query_kept_in_a_style_block(env: jinja2.Environment) -> None:
    issue = render(env, [article()])

    styles = re.findall(r"<style[^>]*>(.*?)</style>", issue.html, re.DOTALL)
    assert len(styles) == 1
    assert "@media (max-width: 620px)" in styles[0]
    assert "!important" in styles[0]
    assert re.search(r'<table [^>]*class="container"[^>]*style="[^"]*max-width:600px', issue.html)
    assert re.search(r"<td [^>]*style='[^']*font-family:-apple-system", issue.html)


def test_html_is_email_client_safe(env: jinja2.Environment) -> None:
    issue = render(env, [article(), article("Second")])

    tables = re.findall(r"<table\b[^>]*>", issue.html)
    assert tables
    assert all('role="presentation"' in table for table in tables)
    assert "<script" not in issue.html
    assert "flex" not in issue.html
    assert "grid" not in issue.html
    assert '<meta name="viewport"' in issue.html
    assert issue.html.startswith("<!DOCTYPE html>")


def test_text_is_wrapped_at_72_columns_without_breaking_urls(env: jinja2.Environment) -> None:
    long_url = "https://news.example.com/" + "very-long-path-segment/" * 6 + "story?id=12345"
    issue = render(
        env,
        [article("A " * 50 + "long title", summary="word " * 200, url=long_url)],
        archive_url=None,
    )

    for line in issue.text.splitlines():
        if "https://" not in line:
            assert len(line) <= 72, line
    assert f"Read the full article: {long_url}\n" in issue.text


def test_non_ascii_text_is_kept(env: jinja2.Environment) -> None:
    issue = render(env, [article("Zürich votes — 東京 reacts", summary="Ça va, señor?")])

    assert "Zürich votes — 東京 reacts" in issue.html
    assert "Zürich votes — 東京 reacts" in issue.text
    assert "Ça va, señor?" in issue.text


def test_issue_without_articles_still_renders(env: jinja2.Environment) -> None:
    issue = render(env, [])

    assert "There are no new articles in this issue." in issue.html
    assert "There are no new articles in this issue." in issue.text
    assert MARKERS.unsubscribe_url in issue.html


def test_default_subject_names_list_date_and_lead_story() -> None:
    subject = default_subject("World Digest", ISSUE_DATE, [article("Talks resume in Geneva")])

    assert subject == "World Digest, 28 Nov 2026: Talks resume in Geneva"


def test_default_subject_is_one_short_line() -> None:
    title = "Leaders\nmeet =?utf-8?q?x?= " + "again and again " * 20
    subject = default_subject("World Digest", ISSUE_DATE, [article(title)])

    assert len(subject) <= 120
    assert "\n" not in subject
    assert "=?" not in subject
    assert subject.startswith("World Digest, 28 Nov 2026: Leaders meet")
    assert subject.endswith("…")


def test_default_subject_without_articles() -> None:
    assert default_subject("World Digest", ISSUE_DATE, []) == "World Digest, 28 Nov 2026"


def test_confirmation_asks_to_confirm_with_the_link(env: jinja2.Environment) -> None:
    url = "https://news.example.org/confirm/abc.DEF?x=1&y=2"
    issue = render_confirmation("World <Digest> & Co", url, env)

    assert issue.subject == "Confirm your subscription to World <Digest> & Co"
    assert "World &lt;Digest&gt; &amp; Co" in issue.html
    assert "<Digest>" not in issue.html
    assert re.search(
        r'<a [^>]*href="https://news\.example\.org/confirm/abc\.DEF\?x=1&amp;y=2"', issue.html
    )
    assert "If you did not ask to subscribe" in issue.html
    assert f"\n{url}\n" in issue.text
    assert "If you did not ask to subscribe" in issue.text
    assert "<script" not in issue.html


def test_environment_refuses_undefined_variables(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "x.html").write_text("{{ missing }}")
    env = make_environment(tmp_path)

    with pytest.raises(jinja2.UndefinedError):
        env.get_template("email/x.html").render()


def test_inline_css_never_fetches_external_stylesheets() -> None:
    html = (
        '<html><head><link rel="stylesheet" href="http://127.0.0.1:9/x.css">'
        "<style>p { color: red }</style></head><body><p>hi</p></body></html>"
    )

    out = inline_css(html)

    assert '<p style="color:red">hi</p>' in out
