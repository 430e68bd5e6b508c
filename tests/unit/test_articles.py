"""Unit tests for newsletter.articles: parsing the article formats and summarizing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from newsletter.articles import (
    SAMPLE_ARTICLES_DIR,
    ArticleParseError,
    ParsedArticle,
    parse_feed,
    parse_json,
    parse_source,
    parse_text,
    split_sentences,
    summarize,
    summary_for,
)

DATA = Path(__file__).resolve().parent.parent / "data"
SEED = DATA / "seed_world.txt"
SEED_TITLE = "Putin Initiates Strategic Talks with Syria's New Leader Ahmad al-Sharaa"


def _article(
    body: str, *, section: str = "World", title: str = "A title", summary: str | None = None
) -> ParsedArticle:
    return ParsedArticle(section=section, title=title, body=body, summary=summary)


# --------------------------------------------------------------------------- plain text


class TestPlainText:
    def test_seed_parses_section_title_and_eight_paragraphs(self) -> None:
        (article,) = parse_source(SEED.name, SEED.read_bytes())
        assert article.section == "World"
        assert article.title == SEED_TITLE
        assert len(article.paragraphs) == 8
        assert not article.body.startswith(SEED_TITLE)
        assert article.body.count(SEED_TITLE) == 0
        assert article.body.startswith("Moscow's diplomatic landscape took a significant turn")
        assert article.paragraphs[-1].endswith("Middle Eastern geopolitical theatre.")
        assert "Russia’s airbase" in article.body  # curly apostrophe survives decoding
        assert article.url is None and article.published_at is None and article.summary is None

    def test_paragraphs_are_joined_by_blank_lines_and_normalised(self) -> None:
        text = "World\n\nTitle\n\nFirst   line\nwrapped here.\n\n\n\n  Second\tparagraph.  \n"
        (article,) = parse_text(text, source="t.txt")
        assert article.body == "First line wrapped here.\n\nSecond paragraph."
        assert article.paragraphs == ["First line wrapped here.", "Second paragraph."]

    def test_repeated_title_is_dropped_once(self) -> None:
        text = "Europe\n\nBridge reopens\n\nBridge   reopens\n\nTraffic flows again.\n"
        (article,) = parse_text(text, source="t.txt")
        assert article.section == "Europe"
        assert article.title == "Bridge reopens"
        assert article.paragraphs == ["Traffic flows again."]

    def test_title_not_repeated_keeps_first_paragraph(self) -> None:
        text = "Asia\nRice harvest up\nFarmers reported a strong season.\n\nPrices fell.\n"
        (article,) = parse_text(text, source="t.txt")
        assert article.title == "Rice harvest up"
        assert article.paragraphs == ["Farmers reported a strong season.", "Prices fell."]

    def test_crlf_bom_and_control_characters(self) -> None:
        raw = "\ufeffWorld\r\n\r\nTi\x00tle\x07 here\r\n\r\nBody\x1b text\twith tab.\r\n"
        (article,) = parse_source("t.txt", raw.encode("utf-8"))
        assert article.section == "World"
        assert article.title == "Title here"
        assert article.body == "Body text with tab."

    def test_html_is_kept_literally(self) -> None:
        text = "World\n\n<b>Bold</b> & co\n\n<p>Kept as text &amp; not parsed</p>\n"
        (article,) = parse_text(text, source="t.txt")
        assert article.title == "<b>Bold</b> & co"
        assert article.body == "<p>Kept as text &amp; not parsed</p>"

    def test_section_override(self) -> None:
        (article,) = parse_source(SEED.name, SEED.read_bytes(), section="Middle East")
        assert article.section == "Middle East"

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("", "empty file"),
            ("  \n\n\t\n", "empty file"),
            ("World\n\n", "no title"),
            ("World\n\nJust a title\n", "no body"),
            ("World\n\nJust a title\n\nJust a title\n\n", "no body"),
        ],
    )
    def test_errors_name_source_and_reason(self, text: str, reason: str) -> None:
        with pytest.raises(ArticleParseError) as info:
            parse_text(text, source="broken.txt")
        message = str(info.value)
        assert message.startswith("broken.txt: ")
        assert reason in message
        assert "\n" not in message


# --------------------------------------------------------------------------- JSON


class TestJson:
    def test_single_object(self) -> None:
        doc = {
            "section": "Africa",
            "title": "Port  expansion\napproved",
            "body": "First paragraph.\n\nSecond\nparagraph.",
            "url": "https://example.org/port",
            "published_at": "2024-05-01T10:00:00+02:00",
            "summary": "A port gets bigger.",
        }
        (article,) = parse_json(json.dumps(doc), source="one.json")
        assert article.section == "Africa"
        assert article.title == "Port expansion approved"
        assert article.paragraphs == ["First paragraph.", "Second paragraph."]
        assert article.url == "https://example.org/port"
        assert article.published_at == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
        assert article.summary == "A port gets bigger."

    def test_list_with_paragraph_list_and_naive_date(self) -> None:
        docs = [
            {"section": "World", "title": "One", "body": ["Para one.", "Para  two."]},
            {"section": "Asia", "title": "Two", "body": "Only.", "published_at": "2024-01-02"},
        ]
        first, second = parse_json(json.dumps(docs), source="list.json")
        assert first.body == "Para one.\n\nPara two."
        assert first.published_at is None
        assert second.section == "Asia"
        assert second.published_at == datetime(2024, 1, 2, tzinfo=UTC)
        assert second.published_at.tzinfo is not None

    def test_zulu_date_and_html_kept_literally(self) -> None:
        doc = {
            "section": "World",
            "title": "T",
            "body": "<script>x</script> & more\x00",
            "published_at": "2024-03-04T05:06:07Z",
        }
        (article,) = parse_json(json.dumps(doc), source="x.json")
        assert article.body == "<script>x</script> & more"
        assert article.published_at == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)

    def test_missing_section_uses_override(self) -> None:
        doc = [{"title": "T", "body": "B."}, {"section": "Asia", "title": "U", "body": "C."}]
        articles = parse_json(json.dumps(doc), source="s.json", section="Climate")
        assert [a.section for a in articles] == ["Climate", "Climate"]

    @pytest.mark.parametrize(
        ("item", "reason"),
        [
            ({"section": "World", "body": "B."}, "missing 'title'"),
            ({"section": "World", "title": "  ", "body": "B."}, "missing 'title'"),
            ({"section": "World", "title": "T"}, "missing 'body'"),
            ({"section": "World", "title": "T", "body": "\n\n"}, "empty 'body'"),
            ({"title": "T", "body": "B."}, "missing 'section'"),
            ({"section": "World", "title": 5, "body": "B."}, "'title' must be a string"),
            ({"section": "World", "title": "T", "body": {"a": 1}}, "'body' must be"),
            ({"section": "World", "title": "T", "body": ["ok", 3]}, "paragraph 2"),
            ({"section": "World", "title": "T", "body": "B.", "url": "ftp://x.org/a"}, "'url'"),
            ({"section": "World", "title": "T", "body": "B.", "url": "not a url"}, "'url'"),
            (
                {"section": "World", "title": "T", "body": "B.", "published_at": "yesterday"},
                "'published_at'",
            ),
            ("just a string", "expected an object"),
        ],
    )
    def test_bad_item_names_its_index_and_rejects_whole_file(
        self, item: object, reason: str
    ) -> None:
        good = {"section": "World", "title": "Good", "body": "Fine."}
        with pytest.raises(ArticleParseError) as info:
            parse_json(json.dumps([good, item]), source="feed.json")
        message = str(info.value)
        assert message.startswith("feed.json: item 2: ")
        assert reason in message

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ('{"title": "T",\n "body": "B."\n "x": 1}', "line 3"),
            ('"a string"', "expected an object or a list"),
            ("42", "expected an object or a list"),
            ("[]", "no articles"),
        ],
    )
    def test_bad_documents(self, text: str, reason: str) -> None:
        with pytest.raises(ArticleParseError) as info:
            parse_json(text, source="world.json")
        assert str(info.value).startswith("world.json: ")
        assert reason in str(info.value)


# --------------------------------------------------------------------------- feeds


class TestFeeds:
    def test_rss_html_description_becomes_plain_text(self) -> None:
        first, second = parse_source("sample_rss.xml", (DATA / "sample_rss.xml").read_bytes())
        assert first.section == "Europe"  # the item's category
        assert first.title == "Harbour talks resume in Valletta"
        assert first.paragraphs == [
            "Negotiators met again on Monday to discuss shipping fees & port access.",
            "The next round is set for April.",
            "Both sides called it “useful”.",
        ]
        assert "<" not in first.body and "&amp;" not in first.body
        assert "alert" not in first.body  # script content dropped
        assert first.url == "https://news.example.org/2024/03/harbour-talks"
        assert first.published_at == datetime(2024, 3, 5, 9, 30, tzinfo=UTC)
        assert first.summary is None

        assert second.section == "Example World Desk"  # no category: the feed title
        assert second.title == "Rainfall eases drought fears & lifts farm outlook"
        assert second.paragraphs == [  # content:encoded wins over the description
            "Farmers across the plains welcomed a week of steady rain.",
            "Reservoirs rose to 61%.",
            "Wheat prices fell.",
        ]
        assert second.summary is not None and second.summary.startswith("Farmers welcomed")
        assert second.published_at == datetime(2024, 3, 6, 12, 0, tzinfo=UTC)

    def test_atom_entries(self) -> None:
        first, second = parse_feed((DATA / "sample_atom.xml").read_bytes(), source="a.atom")
        assert first.section == "Example Atom Wire"
        assert first.title == "Ferry link to reopen after storm repairs"
        assert first.paragraphs == [
            "The island ferry will run again from Monday, officials said.",
            "Repairs to the pier cost €2.5 million & took six weeks.",
        ]
        assert first.summary == "The island ferry returns next week."
        assert first.url == "https://wire.example.net/ferry-link"
        assert first.published_at == datetime(2024, 3, 6, 21, 15, tzinfo=UTC)

        assert second.section == "Africa"
        assert second.paragraphs == [
            "Three carved panels were handed back in a ceremony on Tuesday.",
            "They will go on display in the capital.",
        ]
        assert second.summary is None  # no distinct summary in the entry
        assert second.published_at == datetime(2024, 3, 5, 12, 0, tzinfo=UTC)

    def test_feed_as_str_and_section_override(self) -> None:
        text = (DATA / "sample_atom.xml").read_text(encoding="utf-8")
        articles = parse_feed(text, source="a.xml", section="Climate")
        assert [a.section for a in articles] == ["Climate", "Climate"]
        assert "€2.5 million" in articles[0].body

    def test_feed_without_category_or_title_defaults_to_world(self) -> None:
        rss = (
            "<rss version='2.0'><channel><item><title>T</title>"
            "<description>Line one<br>line two</description></item></channel></rss>"
        )
        (article,) = parse_feed(rss, source="r.rss")
        assert article.section == "World"
        assert article.paragraphs == ["Line one", "line two"]

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"this is not a feed <", "not a readable RSS/Atom feed"),
            (b"<rss version='2.0'><channel><title>x</title></channel></rss>", "no entries"),
            (
                b"<rss version='2.0'><channel><item><description>b</description></item>"
                b"</channel></rss>",
                "entry 1: missing title",
            ),
            (
                b"<rss version='2.0'><channel><item><title>a</title><description>b</description>"
                b"</item><item><title>c</title></item></channel></rss>",
                "entry 2: missing body",
            ),
        ],
    )
    def test_feed_errors(self, data: bytes, reason: str) -> None:
        with pytest.raises(ArticleParseError) as info:
            parse_feed(data, source="bad.xml")
        assert str(info.value).startswith("bad.xml: ")
        assert reason in str(info.value)

    def test_never_treats_data_as_a_url_or_filename(self) -> None:
        with pytest.raises(ArticleParseError):
            parse_feed(str(DATA / "sample_rss.xml"), source="path-like")
        with pytest.raises(ArticleParseError):
            parse_feed("https://example.invalid/feed.xml", source="url-like")


# --------------------------------------------------------------------------- parse_source


class TestParseSource:
    @pytest.mark.parametrize(
        ("name", "data", "expected_title"),
        [
            ("a.txt", b"World\n\nT1\n\nBody.", "T1"),
            ("a.md", b"World\n\nT2\n\nBody.", "T2"),
            ("a.TEXT", b"World\n\nT3\n\nBody.", "T3"),
            ("a.json", b'{"section": "World", "title": "T4", "body": "B."}', "T4"),
            ("-", b'  [{"section": "World", "title": "T5", "body": "B."}]', "T5"),
            ("upload.dat", b'\xef\xbb\xbf{"section": "W", "title": "T6", "body": "B"}', "T6"),
            ("-", b"World\n\nT7\n\nBody.", "T7"),
            (
                "feed",
                b"<rss version='2.0'><channel><item><title>T8</title>"
                b"<description>b</description></item></channel></rss>",
                "T8",
            ),
        ],
    )
    def test_format_by_extension_or_sniffing(
        self, name: str, data: bytes, expected_title: str
    ) -> None:
        (article,) = parse_source(name, data)
        assert article.title == expected_title

    def test_extension_beats_sniffing(self) -> None:
        # A .txt file whose title starts with "{" is still plain text.
        (article,) = parse_source("odd.txt", b"World\n\n{curly} title\n\nBody.")
        assert article.title == "{curly} title"

    def test_undecodable_bytes(self) -> None:
        with pytest.raises(ArticleParseError) as info:
            parse_source("latin.txt", "World\n\nCaf\xe9\n\nBody.".encode("latin-1"))
        assert str(info.value).startswith("latin.txt: ")
        assert "UTF-8" in str(info.value)

    def test_feed_with_declared_legacy_encoding(self) -> None:
        rss = (
            "<?xml version='1.0' encoding='ISO-8859-1'?><rss version='2.0'><channel><item>"
            "<title>Café reopens</title><description>Crème brûlée.</description>"
            "</item></channel></rss>"
        ).encode("latin-1")
        (article,) = parse_source("legacy.rss", rss)
        assert article.title == "Café reopens"
        assert article.body == "Crème brûlée."

    def test_section_override_applies_to_every_article(self) -> None:
        articles = parse_source(
            "sample_rss.xml", (DATA / "sample_rss.xml").read_bytes(), section="X"
        )
        assert {a.section for a in articles} == {"X"}


# --------------------------------------------------------------------------- content hash


class TestContentHash:
    def test_stable_across_reparse(self) -> None:
        data = SEED.read_bytes()
        (a,) = parse_source(SEED.name, data)
        (b,) = parse_source(SEED.name, data)
        assert a.content_hash() == b.content_hash()
        assert len(a.content_hash()) == 64
        int(a.content_hash(), 16)

    def test_ignores_case_of_title_and_section_and_whitespace(self) -> None:
        (a,) = parse_text("World\n\nSame Title\n\nOne two.\n\nThree.", source="a.txt")
        (b,) = parse_text("WORLD\n\nsame   title\n\nOne\ntwo.\n\n\n\nThree.", source="b.txt")
        assert a.content_hash() == b.content_hash()

    def test_same_article_from_json_and_text(self) -> None:
        (a,) = parse_text("World\n\nT\n\nP one.\n\nP two.", source="a.txt")
        doc = {"section": "World", "title": "T", "body": ["P one.", "P two."], "url": "http://x.io"}
        (b,) = parse_json(json.dumps(doc), source="b.json")
        assert a.content_hash() == b.content_hash()

    def test_differs_for_different_body_title_or_section(self) -> None:
        base = _article("Body one.")
        assert base.content_hash() != _article("Body two.").content_hash()
        assert base.content_hash() != _article("Body one.", title="Other").content_hash()
        assert base.content_hash() != _article("Body one.", section="Asia").content_hash()

    def test_field_boundaries_matter(self) -> None:
        a = _article("c d", section="a", title="b")
        b = _article("d", section="a", title="b c")
        assert a.content_hash() != b.content_hash()


# --------------------------------------------------------------------------- bundled samples


SAMPLES = sorted(SAMPLE_ARTICLES_DIR.glob("*.txt"))


def test_there_are_twelve_numbered_samples() -> None:
    assert [p.name[:3] for p in SAMPLES] == [f"{n:02d}_" for n in range(1, 13)]


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_bundled_sample_parses(path: Path) -> None:
    (article,) = parse_source(path.name, path.read_bytes())
    assert article.section and article.title
    assert 3 <= len(article.paragraphs) <= 5
    assert 150 <= len(article.body.split()) <= 300
    assert not article.body.startswith(article.title)
    assert summary_for(article)


def test_bundled_samples_vary_in_section_and_include_non_ascii() -> None:
    articles = [parse_source(p.name, p.read_bytes())[0] for p in SAMPLES]
    sections = [a.section for a in articles]
    assert max(set(sections), key=sections.count) == "World"
    assert {"Europe", "Asia", "Africa", "Americas", "Climate"} <= set(sections)
    assert any(not a.body.isascii() or not a.title.isascii() for a in articles)
    assert any("U.S." in a.body for a in articles)
    assert len({a.content_hash() for a in articles}) == len(articles)


# --------------------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "The U.S. economy grew. Prices fell.",
            ["The U.S. economy grew.", "Prices fell."],
            id="us-mid-sentence",
        ),
        pytest.param(
            "Troops returned to the U.S. The deployment ended.",
            ["Troops returned to the U.S.", "The deployment ended."],
            id="us-ends-sentence",
        ),
        pytest.param(
            "He moved to the U.K. in 2019. He likes it.",
            ["He moved to the U.K. in 2019.", "He likes it."],
            id="uk",
        ),
        pytest.param(
            "Mr. Smith met Mrs. Jones. They talked.",
            ["Mr. Smith met Mrs. Jones.", "They talked."],
            id="mr-mrs",
        ),
        pytest.param(
            "Dr. Lee spoke at St. Mary's church. It rained.",
            ["Dr. Lee spoke at St. Mary's church.", "It rained."],
            id="dr-st",
        ),
        pytest.param(
            "The talks began on Jan. 5 in Geneva. They ended on Feb. 2.",
            ["The talks began on Jan. 5 in Geneva.", "They ended on Feb. 2."],
            id="months",
        ),
        pytest.param(
            "J. R. R. Tolkien wrote books. George W. Bush read them.",
            ["J. R. R. Tolkien wrote books.", "George W. Bush read them."],
            id="initials",
        ),
        pytest.param(
            "Growth was 3.5 percent last year. It may slow to 2.1 percent.",
            ["Growth was 3.5 percent last year.", "It may slow to 2.1 percent."],
            id="decimals",
        ),
        pytest.param(
            "He paused... then continued. Nobody noticed.",
            ["He paused... then continued.", "Nobody noticed."],
            id="ellipsis-mid-sentence",
        ),
        pytest.param(
            "She waited… The door opened.",
            ["She waited…", "The door opened."],
            id="unicode-ellipsis-ends-sentence",
        ),
        pytest.param(
            'He said "We will win." Then he left.',
            ['He said "We will win."', "Then he left."],
            id="straight-quotes",
        ),
        pytest.param(
            "She said “It is over.” Then she left.",
            ["She said “It is over.”", "Then she left."],
            id="curly-double-quotes",
        ),
        pytest.param(
            "He said ‘Enough.’ Then there was silence.",
            ["He said ‘Enough.’", "Then there was silence."],
            id="curly-single-quotes",
        ),
        pytest.param(
            '"Is it over?" she asked. Nobody answered.',
            ['"Is it over?" she asked.', "Nobody answered."],
            id="question-inside-quote-continues",
        ),
        pytest.param(
            'Prices rose. "We cannot wait," he said.',
            ["Prices rose.", '"We cannot wait," he said.'],
            id="next-sentence-opens-with-quote",
        ),
        pytest.param(
            "Is it safe? Yes! It is.",
            ["Is it safe?", "Yes!", "It is."],
            id="question-exclamation",
        ),
        pytest.param(
            "They met at 9 a.m. The talks ran late.",
            ["They met at 9 a.m.", "The talks ran late."],
            id="am-pm",
        ),
        pytest.param(
            "First paragraph without a stop\n\nSecond one.",
            ["First paragraph without a stop", "Second one."],
            id="paragraph-break",
        ),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_split_sentences_empty() -> None:
    assert split_sentences("") == []
    assert split_sentences(" \n\n ") == []


# --------------------------------------------------------------------------- summaries


def _words(n: int, stem: str) -> str:
    """A sentence of exactly n words."""
    return " ".join([stem.capitalize()] + [stem] * (n - 1)) + "."


class TestSummarize:
    def test_lead_first_and_budget_respected(self) -> None:
        body = " ".join([_words(20, "alpha"), _words(20, "beta"), _words(20, "gamma")])
        body += "\n\n" + _words(5, "delta")
        assert summarize(body, max_words=60) == " ".join(
            [_words(20, "alpha"), _words(20, "beta"), _words(20, "gamma")]
        )
        assert summarize(body, max_words=45) == " ".join([_words(20, "alpha"), _words(20, "beta")])

    def test_lead_always_included_even_if_over_budget(self) -> None:
        body = _words(80, "long") + " " + _words(3, "short")
        assert summarize(body, max_words=60) == _words(80, "long")

    def test_stops_at_first_sentence_that_does_not_fit(self) -> None:
        body = " ".join([_words(10, "one"), _words(50, "two"), _words(5, "three")])
        assert summarize(body, max_words=20) == _words(10, "one")

    def test_sentences_whole_and_in_order(self) -> None:
        (article,) = parse_source(SEED.name, SEED.read_bytes())
        summary = summarize(article.body)
        sentences = split_sentences(article.body)
        lead = sentences[0]
        assert summary.startswith(lead)
        assert len(summary.split()) <= 60
        # the summary is exactly a prefix of the article's sentences, in order
        taken = split_sentences(summary)
        assert taken == sentences[: len(taken)]

    def test_default_budget_is_sixty_words(self) -> None:
        body = " ".join(_words(15, f"w{i}") for i in range(10))
        assert len(summarize(body).split()) == 60

    def test_empty_body_and_bad_budget(self) -> None:
        assert summarize("") == ""
        with pytest.raises(ValueError):
            summarize("Some text.", max_words=0)

    def test_explicit_summary_wins(self) -> None:
        article = _article("Lead sentence. Another.", summary="Written by an editor.")
        assert summary_for(article) == "Written by an editor."

    def test_summary_for_falls_back_to_body(self) -> None:
        article = _article(_words(10, "lead") + " " + _words(60, "rest"))
        assert summary_for(article) == _words(10, "lead")
        assert summary_for(article, max_words=100) == article.body
