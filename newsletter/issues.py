"""Articles in, issues out: store parsed articles, compose an issue, preview it.

Parsing, summarising and rendering are pure (articles.py, compose.py); this module feeds them
from the database and stores what they return, inside the caller's transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import jinja2
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from newsletter import placeholders
from newsletter.addresses import normalize_email, parse_from_address
from newsletter.articles import ParsedArticle, summary_for
from newsletter.compose import (
    DigestArticle,
    DigestContext,
    RenderedIssue,
    default_subject,
    digest_content,
    render_issue,
)
from newsletter.dkim import DkimSigner
from newsletter.errors import InvalidInput, NotFound
from newsletter.ledger.freeze import start_send
from newsletter.message import check_header_value, format_date
from newsletter.models import (
    Article,
    Issue,
    IssueArticle,
    IssueStatus,
    IssueVariant,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    sections_of,
    utcnow,
)
from newsletter.outgoing import Links, build_for, prepare_issue
from newsletter.samples import SAMPLE_EMAIL, SAMPLE_NAME, SAMPLE_TOKEN
from newsletter.subscriptions import get_list

SUMMARY_WORDS = 60


@dataclass
class IngestReport:
    added: int = 0
    unchanged: int = 0


def store_articles(
    session: Session, articles: Sequence[ParsedArticle], *, source: str
) -> IngestReport:
    """Insert articles not seen before (by content hash). Re-ingesting changes nothing."""
    report = IngestReport()
    hashes = {a.content_hash(): a for a in articles}
    known = set(
        session.scalars(select(Article.content_hash).where(Article.content_hash.in_(list(hashes))))
    )
    for digest, article in hashes.items():
        if digest in known:
            report.unchanged += 1
            continue
        session.add(
            Article(
                content_hash=digest,
                section=article.section,
                title=article.title,
                body=article.body,
                summary=article.summary,
                url=article.url,
                published_at=article.published_at,
                source=source[:500],
            )
        )
        report.added += 1
    report.unchanged += len(articles) - len(hashes)  # duplicates within one input
    session.flush()
    return report


def _as_parsed(row: Article) -> ParsedArticle:
    return ParsedArticle(
        section=row.section,
        title=row.title,
        body=row.body,
        url=row.url,
        published_at=row.published_at,
        summary=row.summary,
    )


def pick_articles(
    session: Session, mlist: MailingList, *, since: datetime | None, limit: int
) -> list[Article]:
    """The list's next articles: with --since, every article ingested since then; otherwise
    those not yet in any issue of this list. Oldest first, at most `limit`."""
    query = select(Article).order_by(Article.ingested_at, Article.id).limit(limit)
    if since is not None:
        query = query.where(Article.ingested_at >= since)
    else:
        used = (
            select(IssueArticle.article_id)
            .join(Issue, Issue.id == IssueArticle.issue_id)
            .where(Issue.list_id == mlist.id)
        )
        query = query.where(Article.id.not_in(used))
    return list(session.scalars(query))


def compose_issue(
    session: Session,
    env: jinja2.Environment,
    list_slug: str,
    *,
    base_url: str,
    postal_address: str,
    since: datetime | None = None,
    max_articles: int = 10,
    subject: str | None = None,
    today: date | None = None,
) -> Issue:
    """Render and inline the digest ONCE and store it as a draft issue."""
    if max_articles < 1:
        raise InvalidInput("--max-articles must be at least 1")
    mlist = get_list(session, list_slug)
    rows = pick_articles(session, mlist, since=since, limit=max_articles)
    if not rows:
        raise InvalidInput(
            f"no new articles for list {list_slug!r}: ingest some, or use --since to reuse"
        )
    digest = [
        DigestArticle(
            section=r.section,
            title=r.title,
            summary=summary_for(_as_parsed(r), max_words=SUMMARY_WORDS),
            url=r.url,
        )
        for r in rows
    ]
    day = today or utcnow().date()
    if subject is not None:
        # An operator's subject with a line break is refused, not flattened: it is what a
        # header injection looks like (CVE-2024-6923).
        check_header_value(subject, "subject")
        subject = " ".join(subject.split())
        if not subject:
            raise InvalidInput("the subject is empty")
    subject = subject or default_subject(mlist.name, day, digest)
    check_header_value(subject, "subject")
    # Drawn now that the content is known: a key that no content field contains.
    markers = placeholders.new_markers(
        digest_content(mlist.name, subject[:300], postal_address, digest)
    )
    issue = Issue(
        list_id=mlist.id,
        subject=subject[:300],
        status=IssueStatus.DRAFT,
        html="",
        text="",
        nonce=secrets.token_hex(6),
        marker_key=markers.key,
        consecutive_failures=0,
    )
    session.add(issue)
    session.flush()  # the archive link needs the id
    session.execute(
        insert(IssueArticle),
        [
            {"issue_id": issue.id, "article_id": r.id, "position": i, "summary": a.summary}
            for i, (r, a) in enumerate(zip(rows, digest, strict=True))
        ],
    )
    rendered = _render(env, mlist, issue, digest, day, base_url, postal_address)
    issue.html, issue.text = rendered.html, rendered.text
    ensure_variants(session, env, issue, base_url=base_url, postal_address=postal_address)
    session.flush()
    return issue


def _render(
    env: jinja2.Environment,
    mlist: MailingList,
    issue: Issue,
    digest: Sequence[DigestArticle],
    day: date,
    base_url: str,
    postal_address: str,
) -> RenderedIssue:
    return render_issue(
        DigestContext(
            list_name=mlist.name,
            list_slug=mlist.slug,
            issue_date=day,
            subject=issue.subject,
            articles=digest,
            postal_address=postal_address,
            markers=placeholders.Markers(issue.marker_key),
            archive_url=f"{base_url}/archive/{mlist.slug}/{issue.id}",
        ),
        env,
    )


def issue_digest(session: Session, issue_id: int) -> list[DigestArticle]:
    """The articles of an issue as they appeared in it, in order."""
    rows = session.execute(
        select(Article.section, Article.title, IssueArticle.summary, Article.url)
        .join(IssueArticle, IssueArticle.article_id == Article.id)
        .where(IssueArticle.issue_id == issue_id)
        .order_by(IssueArticle.position)
    ).all()
    return [DigestArticle(section=a, title=b, summary=c, url=d) for a, b, c, d in rows]


def ensure_variants(
    session: Session,
    env: jinja2.Environment,
    issue: Issue,
    *,
    base_url: str,
    postal_address: str,
) -> int:
    """Render one variant per distinct section choice among the issue's audience, not one
    per reader; choices that select the same articles share one render. A choice that
    selects no article gets an empty variant: its readers are skipped for this issue.
    Returns how many variants were added."""
    keys = set(
        session.scalars(
            select(Subscription.sections)
            .where(
                Subscription.list_id == issue.list_id,
                Subscription.status == SubscriptionStatus.ACTIVE,
                Subscription.paused.is_(False),
                Subscription.sections.is_not(None),
            )
            .distinct()
        )
    )
    keys -= set(
        session.scalars(select(IssueVariant.sections_key).where(IssueVariant.issue_id == issue.id))
    )
    if not keys:
        return 0
    mlist = session.get(MailingList, issue.list_id)
    assert mlist is not None
    digest = issue_digest(session, issue.id)
    day = (issue.created_at or utcnow()).date()
    renders: dict[tuple[int, ...], RenderedIssue] = {
        tuple(range(len(digest))): RenderedIssue(issue.subject, issue.html, issue.text)
    }
    for key in sorted(k for k in keys if k is not None):
        chosen = set(sections_of(key) or [])
        picked = tuple(i for i, a in enumerate(digest) if a.section in chosen)
        if not picked:
            rendered = RenderedIssue(issue.subject, "", "")
        elif picked in renders:
            rendered = renders[picked]
        else:
            subset = [digest[i] for i in picked]
            rendered = renders[picked] = _render(
                env, mlist, issue, subset, day, base_url, postal_address
            )
        session.add(
            IssueVariant(
                issue_id=issue.id,
                sections_key=key,
                article_count=len(picked),
                html=rendered.html,
                text=rendered.text,
            )
        )
    session.flush()
    return len(keys)


def get_issue(session: Session, issue_id: int) -> Issue:
    issue = session.get(Issue, issue_id)
    if issue is None:
        raise NotFound(f"unknown issue {issue_id}")
    return issue


@dataclass(frozen=True)
class SampleReader:
    email: str
    name: str | None
    token: str


SAMPLE_READER = SampleReader(SAMPLE_EMAIL, SAMPLE_NAME, SAMPLE_TOKEN)
"""Whom previews and `issues check` build the issue for: nobody (newsletter/samples.py)."""


def sample_reader() -> SampleReader:
    """The reader of previews and checks: a sample address and name, and a token whose links
    open the test-copy page. Never a real reader: a preview is shared for review."""
    return SAMPLE_READER


def first_active_reader(session: Session, issue: Issue) -> SampleReader | None:
    """The list's first active reader (the demo prints their unsubscribe link)."""
    row = session.execute(
        select(Subscriber.email, Subscriber.name, Subscription.token)
        .join(Subscription, Subscription.subscriber_id == Subscriber.id)
        .where(
            Subscription.list_id == issue.list_id,
            Subscription.status == SubscriptionStatus.ACTIVE,
        )
        .order_by(Subscription.id)
        .limit(1)
    ).first()
    return SampleReader(*row) if row is not None else None


def build_single(
    session: Session,
    issue: Issue,
    links: Links,
    reader: SampleReader,
    *,
    subject_prefix: str = "",
    dkim: DkimSigner | None = None,
) -> tuple[bytes, str, str]:
    """Build one reader's message exactly as delivery does (signed when `dkim` is given);
    returns (bytes, html, text)."""
    mlist = session.get(MailingList, issue.list_id)
    assert mlist is not None
    prepared = prepare_issue(issue, mlist, subject_prefix=subject_prefix, dkim=dkim)
    data, _mid = build_for(
        prepared,
        links,
        delivery_id=0,
        email=reader.email,
        name=reader.name,
        token=reader.token,
        date=format_date(),
    )
    import email
    import email.policy

    msg = email.message_from_bytes(data, policy=email.policy.default)
    html = text = ""
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            html = part.get_content()
        elif part.get_content_type() == "text/plain":
            text = part.get_content()
    return data, html, text


@dataclass(frozen=True)
class SampleCopy:
    sender: str
    recipient: str
    data: bytes


def sample_copy(
    session: Session,
    issue_id: int,
    address: str,
    links: Links,
    *,
    dkim: DkimSigner | None = None,
) -> SampleCopy:
    """The message an operator's test send delivers: the issue as a reader gets it, subject
    prefixed [TEST], to one address, with the sample reader's links (they open the test-copy
    page and act on nobody). Sending it changes nothing in the ledger."""
    email = normalize_email(address)
    issue = get_issue(session, issue_id)
    reader = SampleReader(email, None, SAMPLE_TOKEN)
    data, _html, _text = build_single(
        session, issue, links, reader, subject_prefix="[TEST] ", dkim=dkim
    )
    mlist = session.get(MailingList, issue.list_id)
    assert mlist is not None
    return SampleCopy(parse_from_address(mlist.from_address)[1], email, data)


def write_preview(
    session: Session,
    issue_id: int,
    links: Links,
    out_dir: Path,
    *,
    dkim: DkimSigner | None = None,
) -> tuple[Path, Path, Path]:
    issue = get_issue(session, issue_id)
    data, html, text = build_single(session, issue, links, sample_reader(), dkim=dkim)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{issue_id}.html", out_dir / f"{issue_id}.txt", out_dir / f"{issue_id}.eml")
    paths[0].write_text(html, encoding="utf-8")
    paths[1].write_text(text, encoding="utf-8")
    paths[2].write_bytes(data)
    return paths


def begin_send(
    session: Session,
    env: jinja2.Environment,
    issue_id: int,
    *,
    batch_size: int,
    base_url: str,
    postal_address: str,
) -> list[int]:
    """Everything `issues send` does before the first message, in the caller's transaction:
    render any section variant the audience needs (choices made since compose), freeze the
    audience, cut batches. Returns batch ids to enqueue after commit."""
    issue = get_issue(session, issue_id)
    if issue.status == IssueStatus.DRAFT:
        ensure_variants(session, env, issue, base_url=base_url, postal_address=postal_address)
    return start_send(session, issue_id, batch_size=batch_size)
