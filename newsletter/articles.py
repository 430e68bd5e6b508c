"""Parse the article formats (plain text, JSON, RSS/Atom) and summarize articles.

Pure: no database, no network, no file writes. Every parser returns a list of
:class:`ParsedArticle` or raises :class:`ArticleParseError` with a one-line message that
names the source and the reason. A file is all or nothing: one bad item rejects the file.

Text and JSON input is plain text: any HTML in it is kept literally (escaping happens at
render time). Feed content is HTML and is converted to plain text here.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "SAMPLE_ARTICLES_DIR",
    "ArticleParseError",
    "ParsedArticle",
    "parse_feed",
    "parse_json",
    "parse_source",
    "parse_text",
    "split_sentences",
    "summarize",
    "summary_for",
]

SAMPLE_ARTICLES_DIR = Path(__file__).parent / "data" / "sample_articles"

DEFAULT_SECTION = "World"

_TEXT_EXTENSIONS = frozenset({".txt", ".text", ".md"})
_JSON_EXTENSIONS = frozenset({".json"})
_FEED_EXTENSIONS = frozenset({".xml", ".rss", ".atom"})


class ArticleParseError(ValueError):
    """One-line message naming the source and the reason.

    e.g. ``"world.json: line 3: expected ',' delimiter"`` or
    ``"feed.json: item 2: missing 'title'"``.
    """


# --------------------------------------------------------------------------- text cleaning

# C0 controls except \t and \n, DEL, and C1 controls. \r is handled before this runs.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BLANK_LINE_RE = re.compile(r"\n[^\S\n]*\n\s*")


def _clean(text: str) -> str:
    """Normalise newlines, drop a leading BOM, and remove control characters but \\n, \\t."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    return _CONTROL_RE.sub("", text)


def _collapse(text: str) -> str:
    """Collapse every run of whitespace to a single space and strip the ends."""
    return " ".join(text.split())


def _paragraphs(text: str) -> list[str]:
    """Split cleaned text on blank lines; each paragraph whitespace-normalised, none empty."""
    return [p for p in (_collapse(chunk) for chunk in _BLANK_LINE_RE.split(text)) if p]


# --------------------------------------------------------------------------- the article


@dataclass(frozen=True)
class ParsedArticle:
    section: str
    title: str
    body: str  # paragraphs joined by "\n\n", each whitespace-normalised plain text
    url: str | None = None
    published_at: datetime | None = None  # timezone-aware (UTC if the input had no zone)
    summary: str | None = None  # explicit summary from the input, else None

    @property
    def paragraphs(self) -> list[str]:
        return [p for p in (_collapse(chunk) for chunk in self.body.split("\n\n")) if p]

    def content_hash(self) -> str:
        """sha256 hex of the normalised section, title and body.

        Section and title are casefolded, all whitespace is collapsed, so the same article
        re-ingested (even re-wrapped) gives the same hash. url, date and summary are not part
        of it.
        """
        key = json.dumps(
            [
                _collapse(self.section).casefold(),
                _collapse(self.title).casefold(),
                _collapse(self.body),
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _override(
    articles: list[ParsedArticle], section: str | None, source: str
) -> list[ParsedArticle]:
    if section is None:
        return articles
    name = _collapse(_clean(section))
    if not name:
        raise ArticleParseError(f"{source}: the section override is empty")
    return [replace(a, section=name) for a in articles]


# --------------------------------------------------------------------------- plain text


def parse_text(text: str, *, source: str, section: str | None = None) -> list[ParsedArticle]:
    """Parse the plain-text format (one article per file).

    First non-empty line: section. Next non-empty line: title. An immediate repeat of the
    title is dropped. The rest: paragraphs separated by blank lines.
    """
    text = _clean(text)
    lines = text.split("\n")
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if not nonblank:
        raise ArticleParseError(f"{source}: empty file")
    file_section = _collapse(lines[nonblank[0]])
    if len(nonblank) < 2:
        raise ArticleParseError(f"{source}: no title after the section line")
    title_index = nonblank[1]
    title = _collapse(lines[title_index])
    paragraphs = _paragraphs("\n".join(lines[title_index + 1 :]))
    if paragraphs and paragraphs[0] == title:
        paragraphs = paragraphs[1:]
    if not paragraphs:
        raise ArticleParseError(f"{source}: no body paragraphs after the title")
    article = ParsedArticle(section=file_section, title=title, body="\n\n".join(paragraphs))
    return _override([article], section, source)


# --------------------------------------------------------------------------- JSON


def _valid_url(url: str) -> bool:
    if any(ch.isspace() for ch in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _parse_datetime(value: str) -> datetime:
    """ISO 8601 -> aware datetime in UTC (naive input is taken as UTC)."""
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _json_item(item: object, where: str, section: str | None) -> ParsedArticle:
    if not isinstance(item, dict):
        raise ArticleParseError(f"{where}: expected an object, got {_json_type(item)}")

    def text_field(key: str) -> str | None:
        value = item.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ArticleParseError(f"{where}: '{key}' must be a string, got {_json_type(value)}")
        return _collapse(_clean(value)) or None

    item_section = text_field("section")
    if item_section is None and section is None:
        raise ArticleParseError(f"{where}: missing 'section'")

    title = text_field("title")
    if title is None:
        raise ArticleParseError(f"{where}: missing 'title'")

    raw_body = item.get("body")
    if raw_body is None:
        raise ArticleParseError(f"{where}: missing 'body'")
    if isinstance(raw_body, str):
        paragraphs = _paragraphs(_clean(raw_body))
    elif isinstance(raw_body, list):
        paragraphs = []
        for n, chunk in enumerate(raw_body, start=1):
            if not isinstance(chunk, str):
                raise ArticleParseError(
                    f"{where}: 'body' paragraph {n} must be a string, got {_json_type(chunk)}"
                )
            paragraphs.extend(_paragraphs(_clean(chunk)))
    else:
        raise ArticleParseError(
            f"{where}: 'body' must be a string or a list of strings, got {_json_type(raw_body)}"
        )
    if not paragraphs:
        raise ArticleParseError(f"{where}: empty 'body'")

    url = text_field("url")
    if url is not None and not _valid_url(url):
        raise ArticleParseError(f"{where}: 'url' must be an http(s) URL, got {url!r}")

    published_at = None
    raw_date = text_field("published_at")
    if raw_date is not None:
        try:
            published_at = _parse_datetime(raw_date)
        except ValueError:
            raise ArticleParseError(
                f"{where}: 'published_at' is not an ISO 8601 date: {raw_date!r}"
            ) from None

    return ParsedArticle(
        section=item_section or DEFAULT_SECTION,  # replaced by the override when missing
        title=title,
        body="\n\n".join(paragraphs),
        url=url,
        published_at=published_at,
        summary=text_field("summary"),
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_json(text: str, *, source: str, section: str | None = None) -> list[ParsedArticle]:
    """Parse one JSON object or a list of objects into articles.

    Items are numbered from 1 in error messages ("feed.json: item 2: missing 'title'").
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArticleParseError(f"{source}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ArticleParseError(f"{source}: invalid JSON: nested too deeply") from None
    if isinstance(data, dict):
        items: list[Any] = [data]
    elif isinstance(data, list):
        items = data
    else:
        raise ArticleParseError(
            f"{source}: line 1: expected an object or a list, got {_json_type(data)}"
        )
    if not items:
        raise ArticleParseError(f"{source}: no articles (empty list)")
    articles = [
        _json_item(item, f"{source}: item {n}", section) for n, item in enumerate(items, start=1)
    ]
    return _override(articles, section, source)


# --------------------------------------------------------------------------- HTML -> text

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt",
        "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header",
        "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td", "th", "tr",
        "ul",
    }
)  # fmt: skip
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "title"})
_BREAK = "\n\n"


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append(_BREAK)

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            # A newline inside running text is just a space; only tags make paragraphs.
            self.parts.append(data.replace("\n", " "))


def _html_to_paragraphs(html: str) -> list[str]:
    extractor = _TextExtractor()
    extractor.feed(_clean(html))
    extractor.close()
    return _paragraphs(_clean("".join(extractor.parts)))


def _detail_to_paragraphs(value: str, content_type: str | None) -> list[str]:
    if content_type and content_type.lower() == "text/plain":
        return _paragraphs(_clean(value))
    return _html_to_paragraphs(value)


# --------------------------------------------------------------------------- feeds


def _struct_to_datetime(value: Any) -> datetime | None:
    try:
        year, month, day, hour, minute, second = tuple(value)[:6]
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except (TypeError, ValueError, OverflowError):
        return None


def _feed_entry(entry: Any, where: str, feed_title: str | None) -> ParsedArticle:
    raw_title = entry.get("title") or ""
    title_type = (entry.get("title_detail") or {}).get("type")
    title = _collapse(" ".join(_detail_to_paragraphs(raw_title, title_type)))
    if not title:
        raise ArticleParseError(f"{where}: missing title")

    paragraphs: list[str] = []
    from_content = False
    for content in entry.get("content") or []:
        paragraphs = _detail_to_paragraphs(content.get("value") or "", content.get("type"))
        if paragraphs:
            from_content = True
            break
    summary_detail = entry.get("summary_detail") or {}
    summary_paragraphs = _detail_to_paragraphs(
        entry.get("summary") or "", summary_detail.get("type")
    )
    if not paragraphs:
        paragraphs = summary_paragraphs
    if not paragraphs:
        raise ArticleParseError(f"{where}: missing body (no content, summary or description)")
    summary = None
    # feedparser copies lone content into `summary`; only a distinct one is an explicit summary
    if from_content and summary_paragraphs and summary_paragraphs != paragraphs:
        summary = " ".join(summary_paragraphs)

    link = entry.get("link")
    url = link.strip() if isinstance(link, str) and _valid_url(link.strip()) else None

    published_at = None
    for key in ("published_parsed", "updated_parsed"):
        if entry.get(key):
            published_at = _struct_to_datetime(entry.get(key))
            if published_at is not None:
                break

    entry_section = None
    for tag in entry.get("tags") or []:
        term = _collapse(_clean(tag.get("term") or tag.get("label") or ""))
        if term:
            entry_section = term
            break

    return ParsedArticle(
        section=entry_section or feed_title or DEFAULT_SECTION,
        title=title,
        body="\n\n".join(paragraphs),
        url=url,
        published_at=published_at,
        summary=summary,
    )


def _bozo_reason(exc: object) -> str:
    if exc is None:
        return "malformed feed"
    get_line = getattr(exc, "getLineNumber", None)
    get_message = getattr(exc, "getMessage", None)
    if callable(get_line) and callable(get_message):  # xml.sax.SAXParseException
        return _collapse(f"line {get_line()}: {get_message()}")
    return _collapse(str(exc)) or type(exc).__name__


def parse_feed(
    data: bytes | str, *, source: str, section: str | None = None
) -> list[ParsedArticle]:
    """Parse an RSS or Atom document (never fetched: the data is given) into articles.

    bytes are decoded by feedparser (honouring the XML encoding declaration); str is taken
    as already decoded. Entries are numbered from 1 in error messages.
    """
    headers: dict[str, str] = {}
    if isinstance(data, str):
        raw = data.lstrip("\ufeff").encode("utf-8")
        headers["content-type"] = "application/xml; charset=utf-8"
    else:
        raw = data
    import feedparser  # here, not at the top: it costs every CLI command 40 ms to import

    # A stream, never a str/bytes: feedparser would treat those as a URL or a filename.
    result = feedparser.parse(
        io.BytesIO(raw), response_headers=headers, resolve_relative_uris=False
    )
    entries = result.get("entries") or []
    if not entries:
        if result.get("bozo"):
            reason = _bozo_reason(result.get("bozo_exception"))
            raise ArticleParseError(f"{source}: not a readable RSS/Atom feed: {reason}")
        raise ArticleParseError(f"{source}: the feed has no entries")
    feed = result.get("feed") or {}
    feed_title = (
        _collapse(
            " ".join(
                _detail_to_paragraphs(
                    feed.get("title") or "", (feed.get("title_detail") or {}).get("type")
                )
            )
        )
        or None
    )
    articles = [
        _feed_entry(entry, f"{source}: entry {n}", feed_title)
        for n, entry in enumerate(entries, start=1)
    ]
    return _override(articles, section, source)


# --------------------------------------------------------------------------- any source

_XML_ENCODING_RE = re.compile(rb"""^\s*<\?xml[^>]*\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def _format_for(name: str, text: str | None) -> str:
    suffix = Path(name).suffix.lower() if name != "-" else ""
    if suffix in _TEXT_EXTENSIONS:
        return "text"
    if suffix in _JSON_EXTENSIONS:
        return "json"
    if suffix in _FEED_EXTENSIONS:
        return "feed"
    head = (text or "").lstrip("\ufeff \t\r\n")
    if head.startswith(("{", "[")):
        return "json"
    if head.startswith("<"):
        return "feed"
    return "text"


def parse_source(name: str, data: bytes, *, section: str | None = None) -> list[ParsedArticle]:
    """Parse the bytes of a named source ("-" for stdin), choosing the format by extension.

    .txt/.text/.md -> text, .json -> JSON, .xml/.rss/.atom -> feed; anything else is sniffed
    ({ or [ -> JSON, < -> feed, else text). The data must be UTF-8 (a BOM is fine); the one
    exception is a feed whose XML declaration names another encoding, decoded as declared.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        declared = _XML_ENCODING_RE.match(data)
        encoding = declared.group(1).decode("ascii").lower() if declared else "utf-8"
        if encoding not in ("utf-8", "utf8") and _format_for(name, "<") == "feed":
            return parse_feed(data, source=name, section=section)
        raise ArticleParseError(f"{name}: not valid UTF-8 (byte offset {exc.start})") from None
    kind = _format_for(name, text)
    if kind == "json":
        return parse_json(text, source=name, section=section)
    if kind == "feed":
        return parse_feed(text, source=name, section=section)
    return parse_text(text, source=name, section=section)


# --------------------------------------------------------------------------- sentences

# Abbreviations after which a period never ends a sentence (titles and the like).
_NEVER_FINAL = frozenset(
    {
        "mr", "mrs", "ms", "mx", "dr", "prof", "st", "sr", "jr", "sen", "rep", "gov", "gen", "lt",
        "col", "capt", "cmdr", "sgt", "maj", "adm", "rev", "hon", "pres", "mt", "ft", "messrs",
        "mme", "mlle", "vs", "cf", "approx", "dept", "univ",
    }
)  # fmt: skip
# Abbreviations that may end a sentence: split only if a sentence starter follows.
_MAYBE_FINAL = frozenset(
    {
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "inc",
        "ltd", "co", "corp", "bros", "plc", "etc", "al", "no", "nos", "vol", "fig", "est", "ave",
        "blvd", "rd",
    }
)  # fmt: skip
# Words that usually begin a sentence (lower-cased); used after an ambiguous abbreviation.
_STARTERS = frozenset(
    {
        "a", "an", "the", "this", "that", "these", "those", "it", "its", "he", "she", "they", "we",
        "i", "you", "his", "her", "their", "our", "my", "there", "here", "but", "and", "or", "so",
        "yet", "however", "meanwhile", "in", "on", "at", "for", "after", "before", "when", "while",
        "as", "if", "then", "since", "although", "though", "still", "also", "both", "many", "some",
        "most", "several", "last", "earlier", "later", "officials", "critics", "analysts", "others",
        "nobody", "what", "why", "how", "who", "where",
    }
)  # fmt: skip
_BOUNDARY_RE = re.compile(r"(\.{2,}|…|[.!?]+)([\"'”’»)\]]*)\s+")
_OPENERS = "\"'“‘«([¿¡"
_ACRONYM_RE = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # "U.S" of "U.S.", "a.m" of "a.m."
_INITIAL_RE = re.compile(r"^[A-Z]$")
_NEXT_WORD_RE = re.compile(r"[\"'“‘«(\[]*([^\s\"'”’»)\].,;:!?]+)(\.?)")


def _is_boundary(before: str, punct: str, after: str) -> bool:
    """Does the text end a sentence at `punct` (preceded by `before`, followed by `after`)?"""
    first = after.lstrip(_OPENERS)[:1]
    if not first or first.islower():
        return False
    if punct != ".":
        return True  # ! ? and ellipses followed by a capital or a digit
    word = before.rsplit(None, 1)[-1].lstrip(_OPENERS) if before.strip() else ""
    lowered = word.lower()
    if lowered in _NEVER_FINAL:
        return False
    if lowered in _MAYBE_FINAL or _ACRONYM_RE.match(word) or _INITIAL_RE.match(word):
        nxt = _NEXT_WORD_RE.match(after)
        if not nxt:
            return True
        next_word, next_dot = nxt.group(1), nxt.group(2)
        if next_dot and _INITIAL_RE.match(next_word):
            return False  # another initial: "J. R. R. Tolkien"
        return next_word.lower() in _STARTERS
    return True


def _paragraph_sentences(paragraph: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY_RE.finditer(paragraph):
        end = match.end(2)
        if _is_boundary(paragraph[start : match.start(1)], match.group(1),
                        paragraph[match.end() :]):  # fmt: skip
            sentence = paragraph[start:end].strip()
            if sentence:
                sentences.append(sentence)
            start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_sentences(text: str) -> list[str]:
    """Split plain text into sentences, in order, whitespace-normalised.

    Paragraph breaks (blank lines) always end a sentence. Survives dotted abbreviations
    ("U.S.", "a.m."), titles ("Mr.", "Dr.", "St."), months ("Jan. 5"), initials
    ("J. R. R. Tolkien"), decimals ("3.5"), ellipses, and sentence ends inside quotes
    (the split comes after the closing quote).
    """
    sentences: list[str] = []
    for paragraph in _paragraphs(_clean(text)):
        sentences.extend(_paragraph_sentences(paragraph))
    return sentences


def _word_count(text: str) -> int:
    return len(text.split())


def summarize(body: str, *, max_words: int = 60) -> str:
    """Extractive summary: the lead sentence always, then following sentences in order
    while the total stays within `max_words` (stopping at the first that does not fit)."""
    if max_words < 1:
        raise ValueError("max_words must be at least 1")
    sentences = split_sentences(body)
    if not sentences:
        return ""
    chosen = [sentences[0]]
    total = _word_count(sentences[0])
    for sentence in sentences[1:]:
        words = _word_count(sentence)
        if total + words > max_words:
            break
        chosen.append(sentence)
        total += words
    return " ".join(chosen)


def summary_for(article: ParsedArticle, *, max_words: int = 60) -> str:
    """The article's explicit summary if it has one, else summarize(body)."""
    if article.summary and article.summary.strip():
        return article.summary
    return summarize(article.body, max_words=max_words)
