"""The public archive (pure): an issue as sent, without any reader's personal links, and the
Atom feed of a list's sent issues."""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from xml.etree import ElementTree as ET

from newsletter.message import fill_placeholders
from newsletter.placeholders import Markers

ARCHIVE_NAME = "reader"
ATOM_NS = "http://www.w3.org/2005/Atom"


# The digest footer's personal links, as the composer writes them (premailer keeps the
# attribute order and quoting). A separator after the preferences link goes with it.
def _preferences_link(markers: Markers) -> re.Pattern[str]:
    return re.compile(
        r"<a\b[^>]*\bhref=\"" + re.escape(markers.preferences_url) + r"\"[^>]*>.*?</a>"
        r"(?:[\s\u00a0]|&nbsp;)*(?:\u00b7|&middot;|&#183;)?(?:[\s\u00a0]|&nbsp;)*",
        re.DOTALL,
    )


def _unsubscribe_link(markers: Markers) -> re.Pattern[str]:
    return re.compile(
        r"(<a\b[^>]*\bhref=\")" + re.escape(markers.unsubscribe_url) + r"(\"[^>]*>).*?(</a>)",
        re.DOTALL,
    )


_BODY_OPEN = re.compile(r"<body\b[^>]*>", re.IGNORECASE)


def public_html(
    html: str, *, markers: Markers, subscribe_url: str, index_url: str, list_name: str
) -> str:
    """An issue's stored html as anyone may see it: the greeting names nobody, the
    preferences link is gone, the unsubscribe link becomes a subscribe link, and a bar on top
    leads back to the list's archive."""
    html = _preferences_link(markers).sub("", html)
    escaped_subscribe = _escape(subscribe_url)
    html = _unsubscribe_link(markers).sub(
        lambda m: f"{m.group(1)}{escaped_subscribe}{m.group(2)}Subscribe{m.group(3)}", html
    )
    html = fill_placeholders(
        html,
        name=ARCHIVE_NAME,
        unsubscribe_url=subscribe_url,
        preferences_url=subscribe_url,
        html=True,
        markers=markers,
    )
    bar = (
        '<div style="font-family:system-ui,sans-serif;font-size:14px;padding:8px 16px;'
        'background:#eef2f6;text-align:center">'
        f'<a href="{_escape(index_url)}">All issues of {_escape(list_name)}</a>'
        f' &middot; <a href="{escaped_subscribe}">Subscribe</a></div>'
    )
    match = _BODY_OPEN.search(html)
    if match is None:
        return bar + html
    return html[: match.end()] + bar + html[match.end() :]


@dataclass(frozen=True)
class FeedEntry:
    title: str
    url: str
    updated: datetime
    summary: str


def atom_feed(
    *,
    title: str,
    feed_url: str,
    site_url: str,
    updated: datetime,
    entries: Sequence[FeedEntry],
) -> bytes:
    """An Atom 1.0 document (RFC 4287); the XML writer escapes every text."""
    ET.register_namespace("", ATOM_NS)

    def el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        child = ET.SubElement(parent, f"{{{ATOM_NS}}}{tag}", attrs)
        if text is not None:
            child.text = _xml_safe(text)
        return child

    feed = ET.Element(f"{{{ATOM_NS}}}feed")
    el(feed, "id", site_url)
    el(feed, "title", title)
    el(feed, "updated", _rfc3339(updated))
    el(feed, "link", rel="self", href=feed_url, type="application/atom+xml")
    el(feed, "link", rel="alternate", href=site_url, type="text/html")
    author = el(feed, "author")
    el(author, "name", title)
    for entry in entries:
        item = el(feed, "entry")
        el(item, "id", entry.url)
        el(item, "title", entry.title)
        el(item, "updated", _rfc3339(entry.updated))
        el(item, "link", rel="alternate", href=entry.url, type="text/html")
        if entry.summary:
            el(item, "summary", entry.summary)
    body: bytes = ET.tostring(feed, encoding="utf-8", xml_declaration=True)
    return body


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        return moment.replace(microsecond=0).isoformat() + "Z"
    return moment.replace(microsecond=0).isoformat()


_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    return _XML_INVALID.sub("", text)


def _escape(text: str) -> str:
    return html_lib.escape(text, quote=True)
