"""Render an issue once: the digest templates, then premailer, once per issue and variant.

Pure: no database, no network, no file writes. The result keeps the per-recipient
placeholders of :mod:`newsletter.placeholders` byte for byte; :mod:`newsletter.message`
substitutes them for each reader.

Article text is untrusted. It is HTML-escaped by Jinja2's autoescape, article links are kept
only for http and https URLs and control characters are dropped. Per-reader values are
reachable only through the issue's own markers (:class:`newsletter.placeholders.Markers`),
whose random key no content field contains in any case or encoding: :func:`render_issue`
refuses content that does, so no template filter can turn content into a reader's link.
"""

from __future__ import annotations

import datetime
import logging
import pathlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jinja2
from premailer import Premailer

from newsletter import placeholders

DIGEST_HTML = "email/digest.html"
DIGEST_TEXT = "email/digest.txt"
CONFIRM_HTML = "email/confirm.html"
CONFIRM_TEXT = "email/confirm.txt"

SUBJECT_MAX_CHARS = 120
TEXT_WIDTH = 72
PREHEADER_MAX_CHARS = 140

_MONTHS_SHORT = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
                 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # fmt: skip
_MONTHS_LONG = ("January", "February", "March", "April", "May", "June", "July",
                "August", "September", "October", "November", "December")  # fmt: skip

# C0 and C1 controls and DEL; tabs and newlines are whitespace and handled by the collapse.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class DigestArticle:
    section: str
    title: str
    summary: str
    url: str | None = None


@dataclass(frozen=True)
class DigestContext:
    list_name: str
    list_slug: str
    issue_date: datetime.date
    subject: str
    articles: Sequence[DigestArticle]
    postal_address: str
    markers: placeholders.Markers
    archive_url: str | None = None

    def content(self) -> list[str]:
        """Every text of this context that comes from outside (feeds, the list, the
        operator) and reaches a template: what the markers' key must not be found in."""
        return digest_content(self.list_name, self.subject, self.postal_address, self.articles)


def digest_content(
    list_name: str, subject: str, postal_address: str, articles: Sequence[DigestArticle]
) -> list[str]:
    """The outside texts of a digest (DigestContext.content), before its markers exist."""
    texts = [list_name, subject, postal_address]
    for article in articles:
        texts += [article.section, article.title, article.summary, article.url or ""]
    return texts


@dataclass(frozen=True)
class RenderedIssue:
    subject: str
    html: str
    text: str


def make_environment(templates_dir: pathlib.Path) -> jinja2.Environment:
    """The Jinja2 environment for the email templates under ``templates_dir``.

    Autoescape is on for .html/.xml templates (off for .txt), undefined variables raise.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=jinja2.select_autoescape(["html", "htm", "xml"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["wrap"] = wrap_text
    return env


def wrap_text(text: str, width: int = TEXT_WIDTH, subsequent_indent: str = "") -> str:
    """Wrap prose for the plain-text part at ``width`` columns without breaking URLs
    (or any other long word) and without breaking at hyphens."""
    return textwrap.fill(
        text,
        width=width,
        subsequent_indent=subsequent_indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def one_line(text: str) -> str:
    """Untrusted text as a single clean line: controls dropped, whitespace collapsed."""
    return " ".join(_scrub(text).split())


def safe_link(url: str | None) -> str | None:
    """``url`` when it is an absolute http(s) URL fit for an href, else None."""
    if not url:
        return None
    url = url.strip()
    if not url or _CONTROL_CHARS.search(url) or any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return url


def format_issue_date(issue_date: datetime.date) -> str:
    """'28 November 2026', independent of the process locale."""
    return f"{issue_date.day} {_MONTHS_LONG[issue_date.month - 1]} {issue_date.year}"


def default_subject(
    list_name: str, issue_date: datetime.date, articles: Sequence[DigestArticle]
) -> str:
    """'World Digest, 28 Nov 2026: <first title>', one line, at most SUBJECT_MAX_CHARS.

    The first title is shortened at a word boundary (with an ellipsis) when needed. The
    result never contains CR, LF or '=?', so it passes message.check_header_value.
    """
    date_text = f"{issue_date.day} {_MONTHS_SHORT[issue_date.month - 1]} {issue_date.year}"
    head = _header_safe(f"{one_line(list_name)}, {date_text}")
    if len(head) > SUBJECT_MAX_CHARS:
        return _shorten(head, SUBJECT_MAX_CHARS)
    title = next((t for t in (_header_safe(one_line(a.title)) for a in articles) if t), "")
    if not title:
        return head
    room = SUBJECT_MAX_CHARS - len(head) - 2
    if room < 8:
        return head
    return f"{head}: {_shorten(title, room)}"


def render_issue(ctx: DigestContext, env: jinja2.Environment) -> RenderedIssue:
    """Render digest.html and digest.txt once and inline the html's CSS once.

    The returned html and text still hold the issue's markers (ctx.markers); ValueError when
    some content contains their key.
    """
    placeholders.check_content(ctx.markers, ctx.content())
    articles = [
        {
            "anchor": f"article-{index}",
            "section": one_line(article.section),
            "title": one_line(article.title),
            "summary": one_line(article.summary),
            "url": safe_link(article.url),
        }
        for index, article in enumerate(ctx.articles, start=1)
    ]
    subject = one_line(ctx.subject)
    values: dict[str, Any] = {
        "subject": subject,
        "list_name": one_line(ctx.list_name),
        "list_slug": ctx.list_slug,
        "issue_date": ctx.issue_date,
        "issue_date_long": format_issue_date(ctx.issue_date),
        "articles": articles,
        "postal_lines": [line for line in map(one_line, ctx.postal_address.splitlines()) if line],
        "archive_url": safe_link(ctx.archive_url),
        "preheader": _preheader(articles),
        "rule": "-" * TEXT_WIDTH,
        "name_marker": ctx.markers.name,
        "unsubscribe_marker": ctx.markers.unsubscribe_url,
        "preferences_marker": ctx.markers.preferences_url,
    }
    html = inline_css(env.get_template(DIGEST_HTML).render(values))
    text = env.get_template(DIGEST_TEXT).render(values)
    return RenderedIssue(subject=subject, html=html, text=text)


def render_confirmation(list_name: str, confirm_url: str, env: jinja2.Environment) -> RenderedIssue:
    """The double opt-in email: 'Confirm your subscription to <list>'."""
    name = one_line(list_name)
    subject = _header_safe(f"Confirm your subscription to {name}")
    values = {"subject": subject, "list_name": name, "confirm_url": confirm_url.strip()}
    html = inline_css(env.get_template(CONFIRM_HTML).render(values))
    text = env.get_template(CONFIRM_TEXT).render(values)
    return RenderedIssue(subject=subject, html=html, text=text)


def inline_css(html: str) -> str:
    """Inline the <style> rules into style attributes; touch no network and no file.

    Rules premailer cannot inline (the @media block, pseudo-classes) stay in a <style>
    element in <head>, marked !important (strip_important=False keeps those marks, which
    the media query needs to beat the inlined styles).
    """
    premailer = Premailer(
        html,
        disable_validation=True,
        allow_network=False,
        allow_loading_external_files=False,
        disable_link_rewrites=True,
        strip_important=False,
        cssutils_logging_level=logging.ERROR,
    )
    result: str = premailer.transform(pretty_print=False)
    return result


def _scrub(text: str) -> str:
    """Drop control characters from untrusted text."""
    return _CONTROL_CHARS.sub("", text)


def _header_safe(text: str) -> str:
    """Break any '=?' so a subject can never smuggle an RFC 2047 encoded-word."""
    while "=?" in text:
        text = text.replace("=?", "= ?")
    return text


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


def _preheader(articles: Sequence[dict[str, Any]]) -> str:
    """The inbox preview line: the first titles, joined."""
    text = " · ".join(str(article["title"]) for article in articles[:3] if article["title"])
    return _shorten(text, PREHEADER_MAX_CHARS)
