"""Cost of composing an issue: render digest.html + digest.txt and run premailer, once.

    .venv/bin/python benchmarks/bench_compose.py [--runs N]

Prints plain `name: value` lines:
    compose_10_articles_ms        median over the runs of one 10-article render + premailer
    compose_8_variants_total_ms   median total of 8 section variants (8 renders), one per set
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from newsletter.compose import (  # noqa: E402
    DigestArticle,
    DigestContext,
    default_subject,
    make_environment,
    render_issue,
)
from newsletter.placeholders import Markers  # noqa: E402

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

SECTIONS = ("World", "Europe", "Americas", "Asia", "Africa", "Science", "Business", "Culture")
ISSUE_DATE = datetime.date(2026, 11, 28)
SUMMARY = (
    "Delegations from both sides met for six hours in Geneva on Friday and agreed to resume "
    "talks next week, according to officials briefed on the discussions. The agenda covers "
    "prisoner exchanges, humanitarian corridors and a timetable for a ceasefire — the first "
    "since the spring. Observers in Zürich and São Paulo called the tone “cautiously "
    "constructive”."
)


def sample_articles(count: int = 10, sections: tuple[str, ...] = SECTIONS) -> list[DigestArticle]:
    return [
        DigestArticle(
            section=sections[number % len(sections)],
            title=f"Talks resume in Geneva as negotiators seek a deal, day {number + 1}",
            summary=SUMMARY,
            url=f"https://news.example.com/world/2026/11/28/geneva-talks-{number + 1}?ref=digest",
        )
        for number in range(count)
    ]


def sample_context(articles: list[DigestArticle]) -> DigestContext:
    return DigestContext(
        markers=MARKERS,
        list_name="World Digest",
        list_slug="world",
        issue_date=ISSUE_DATE,
        subject=default_subject("World Digest", ISSUE_DATE, articles),
        articles=articles,
        postal_address="Example News Ltd\n1 Harbour Street\nPortsmouth PO1 1AA",
        archive_url="https://news.example.org/archive/world/7",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    env = make_environment(ROOT / "templates")
    context = sample_context(sample_articles())
    render_issue(context, env)  # warm up: template compilation, imports, the CSS parse cache

    single = []
    for _ in range(args.runs):
        start = time.perf_counter()
        render_issue(context, env)
        single.append((time.perf_counter() - start) * 1000)

    all_articles = sample_articles(40)
    variants = [
        sample_context([a for a in all_articles if a.section != skipped][:10])
        for skipped in SECTIONS
    ]
    totals = []
    for _ in range(max(3, args.runs // 4)):
        start = time.perf_counter()
        for variant in variants:
            render_issue(variant, env)
        totals.append((time.perf_counter() - start) * 1000)

    issue = render_issue(context, env)
    print(f"compose_10_articles_ms: {statistics.median(single):.1f}")
    print(f"compose_8_variants_total_ms: {statistics.median(totals):.1f}")
    print(f"html_chars: {len(issue.html)}")
    print(f"text_chars: {len(issue.text)}")


if __name__ == "__main__":
    main()
