"""The `newsletter` command line. Thin: parse arguments, open a transaction, call the package,
print. User errors print one line on stderr and exit 1, with no traceback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from newsletter import import_rows, imports, subscriptions
from newsletter.articles import ArticleParseError, parse_source
from newsletter.config import ConfigError, get_settings
from newsletter.db import upgrade
from newsletter.dispatch import Dispatcher
from newsletter.errors import InvalidInput, NewsletterError
from newsletter.issue_list import list_issues
from newsletter.ledger.control import cancel_issue, pause_issue, resume_issue
from newsletter.ledger.status import delivery_counts, issue_status
from newsletter.message import HeaderValueError
from newsletter.models import Article, SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.transport import erase_from_outbox

app = typer.Typer(
    help="Self-hosted newsletter delivery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
lists_app = typer.Typer(help="Mailing lists.", no_args_is_help=True)
subs_app = typer.Typer(help="Subscribers of a list.", no_args_is_help=True)
articles_app = typer.Typer(help="Articles to compose issues from.", no_args_is_help=True)
issues_app = typer.Typer(help="Compose, preview and send issues.", no_args_is_help=True)
app.add_typer(lists_app, name="lists")
app.add_typer(subs_app, name="subscribers")
app.add_typer(articles_app, name="articles")
app.add_typer(issues_app, name="issues")
dkim_app = typer.Typer(help="DKIM signing keys.", no_args_is_help=True)
bounces_app = typer.Typer(help="Bounces, complaints and mailed unsubscribes.", no_args_is_help=True)
app.add_typer(dkim_app, name="dkim")
app.add_typer(bounces_app, name="bounces")

USER_ERRORS = (NewsletterError, ConfigError, ArticleParseError, HeaderValueError)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ListOpt = Annotated[str, typer.Option("--list", help="The list's slug.")]


@cache
def rt() -> Runtime:
    """What every command uses (engine, sessions, transport, links, keys, policies), built
    from the settings once, each piece on first use."""
    return Runtime(get_settings())


@cache
def dispatcher() -> Dispatcher:
    return Dispatcher(rt())


@contextmanager
def transaction() -> Iterator[Session]:
    """One transaction per command: everything or nothing."""
    with rt().sessions() as session, session.begin():
        yield session


def out(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def interactive() -> bool:
    return sys.stderr.isatty()


# --- schema ---


@app.command()
def init() -> None:
    """Create or upgrade the database schema."""
    upgrade(rt().engine)
    typer.echo(f"schema is up to date ({rt().engine.url.render_as_string(hide_password=True)})")
    # Seals the suppression key under SECRET_KEY's newest key (made on first use): after a
    # rotation, this is the run that lets the old key go (docs/operations.md).
    if rt().suppression_key:
        typer.echo("suppression key sealed under SECRET_KEY's first key")


@app.command()
def demo() -> None:
    """Run the whole flow on the embedded default: articles, a list, readers, send, preview."""
    from newsletter.demo import run_demo

    run_demo(rt(), echo=typer.echo)


# --- lists ---


@lists_app.command("create")
def lists_create(
    slug: str,
    name: Annotated[str, typer.Option("--name", help="Shown to readers.")],
    from_address: Annotated[str, typer.Option("--from-address", help='"Desk <desk@example.org>"')],
    reply_to: Annotated[str | None, typer.Option("--reply-to")] = None,
) -> None:
    """Create a mailing list."""
    with transaction() as s:
        mlist = subscriptions.create_list(s, slug, name, from_address, reply_to)
        typer.echo(f"created list {mlist.slug!r} ({mlist.name}) from {mlist.from_address}")


@lists_app.command("show")
def lists_show(as_json: JsonOpt = False) -> None:
    """Show every list with its subscriber counts."""
    with transaction() as s:
        rows = subscriptions.list_counts(s)
        data: list[dict[str, Any]] = [
            {
                "slug": m.slug,
                "name": m.name,
                "from_address": m.from_address,
                "reply_to": m.reply_to,
                "counts": counts,
            }
            for m, counts in rows
        ]
    if as_json:
        out(data)
        return
    if not data:
        typer.echo("no lists yet: newsletter lists create SLUG --name N --from-address A")
    for d in data:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(d["counts"].items())) or "no subscribers"
        typer.echo(f"{d['slug']}\t{d['name']}\t{d['from_address']}\t{counts}")


# --- subscribers ---


@subs_app.command("add")
def subs_add(
    email: str,
    list_slug: ListOpt,
    name: Annotated[
        str | None,
        typer.Option("--name", help="A new subscriber's name; an existing reader keeps theirs."),
    ] = None,
    confirmed: Annotated[bool, typer.Option("--confirmed", help="Skip double opt-in.")] = False,
) -> None:
    """Add one subscriber (pending unless --confirmed)."""
    with transaction() as s:
        sub = subscriptions.add_subscriber(
            s,
            email,
            list_slug,
            name=name,
            confirmed=confirmed,
            source="cli",
            suppression_key=rt().suppression_key,
        )
        typer.echo(f"{email.strip()} is {sub.status.value} on {list_slug!r}")


@subs_app.command("import")
def subs_import(
    file: Path,
    list_slug: ListOpt,
    confirmed: Annotated[bool, typer.Option("--confirmed", help="Import as active.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Any bad row aborts all.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import a CSV with a header row (email required; name and other columns optional)."""
    # Read as it is imported, never held whole: a million-row file stays a few MB.
    with import_rows.open_text_file(file, str(file)) as stream, transaction() as s:
        report = imports.import_csv(
            s,
            stream,
            list_slug,
            confirmed=confirmed,
            strict=strict,
            suppression_key=rt().suppression_key,
            name=str(file),
            helpers=import_rows.import_helpers(file.stat().st_size),
        )
    if as_json:
        out(report.as_dict())
        return
    for line, reason in report.rejected:
        typer.echo(f"{file}: line {line}: {reason}", err=True)
    typer.echo(report.summary())


@subs_app.command("export")
def subs_export(
    list_slug: ListOpt,
    output: Annotated[Path | None, typer.Option("--output", help="File (default stdout).")] = None,
) -> None:
    """Export a list as CSV (cells that a spreadsheet would run as formulas are defused)."""
    with transaction() as s:
        subscriptions.get_list(s, list_slug)
        if output is None:
            subscriptions.export_csv(s, list_slug, sys.stdout)
            return
        tmp = output.with_name(output.name + ".part")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            n = subscriptions.export_csv(s, list_slug, fh)
        tmp.replace(output)
    typer.echo(f"exported {n} subscriber(s) to {output}", err=True)


@subs_app.command("list")
def subs_list(
    list_slug: ListOpt,
    status: Annotated[str | None, typer.Option("--status", help="pending, active, ...")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    after: Annotated[int, typer.Option("--after", help="Continue after this id.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List subscribers, oldest first, a page at a time."""
    try:
        wanted = SubscriptionStatus(status) if status else None
    except ValueError:
        choices = ", ".join(s.value for s in SubscriptionStatus)
        raise InvalidInput(f"unknown status {status!r} (choose from {choices})") from None
    # Streamed as the pages come (--limit may be the whole list): never a list in memory.
    with transaction() as s:
        rows = (
            {
                "id": sub.id,
                "email": person.email,
                "name": person.name,
                "status": sub.status.value,
                "subscribed_at": sub.created_at,
            }
            for sub, person in subscriptions.iter_subscriptions(
                s, list_slug, status=wanted, after_id=after, limit=limit
            )
        )
        if as_json:
            out_stream(rows)
            return
        for r in rows:
            sys.stdout.write(f"{r['id']}\t{r['email']}\t{r['name'] or ''}\t{r['status']}\n")
        sys.stdout.flush()


def out_stream(items: Iterator[dict[str, Any]]) -> None:
    """What out(list(items)) prints, written item by item. Nothing is written before the
    first item is there, so an error (an unknown list) leaves no half-written output."""
    first = next(items, None)
    if first is None:
        out([])
        return
    write = sys.stdout.write
    write("[\n")
    item: dict[str, Any] | None = first
    while item is not None:
        text = json.dumps(item, indent=2, default=str, ensure_ascii=False)
        write("  " + text.replace("\n", "\n  "))
        item = next(items, None)
        write(",\n" if item is not None else "\n")
    write("]\n")
    sys.stdout.flush()


@subs_app.command("unsubscribe")
def subs_unsubscribe(email: str, list_slug: ListOpt) -> None:
    """Unsubscribe an address from a list (takes effect for every batch not yet claimed)."""
    with transaction() as s:
        changed = subscriptions.unsubscribe(s, email, list_slug, source="operator")
    typer.echo(
        f"{email.strip()} unsubscribed from {list_slug!r}"
        if changed
        else f"{email.strip()} was already unsubscribed from {list_slug!r}"
    )


@subs_app.command("erase")
def subs_erase(email: str) -> None:
    """Erase an address's personal data everywhere (database, outbox); a keyed hash keeps it
    out until the reader signs up again through the subscribe form and confirms."""
    with transaction() as s:
        n = subscriptions.erase_subscriber(
            s, email, suppression_key=rt().suppression_key, source="operator"
        )
    files = erase_from_outbox(rt().settings.outbox_dir, email.strip())
    # The address itself is not repeated: this output may end up in a log.
    typer.echo(
        f"erased 1 reader ({n} subscription(s), {files} outbox file(s)); "
        "the address is now suppressed"
    )


# --- articles ---


@articles_app.command("ingest")
def articles_ingest(
    paths: Annotated[list[str], typer.Argument(help=".txt, .json, RSS/Atom .xml, or - for stdin")],
    section: Annotated[str | None, typer.Option("--section", help="Override the section.")] = None,
) -> None:
    """Ingest article files. A file that cannot be parsed is an error and adds nothing."""
    from newsletter import issues  # the composer and premailer: only where needed

    parsed = []
    for name in paths:
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{name}: {exc.strerror}") from None
        parsed.append((name, parse_source(name, data, section=section)))
    added = unchanged = 0
    with transaction() as s:
        for name, articles in parsed:
            report = issues.store_articles(s, articles, source=name)
            added += report.added
            unchanged += report.unchanged
    typer.echo(f"ingested {added} new article(s), {unchanged} already known")


@articles_app.command("list")
def articles_list(
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50, as_json: JsonOpt = False
) -> None:
    """List the newest articles."""
    with transaction() as s:
        rows = [
            {
                "id": a.id,
                "section": a.section,
                "title": a.title,
                "url": a.url,
                "published_at": a.published_at,
                "ingested_at": a.ingested_at,
            }
            for a in s.scalars(select(Article).order_by(Article.id.desc()).limit(limit))
        ]
    if as_json:
        out(rows)
        return
    for r in rows:
        typer.echo(f"{r['id']}\t{r['section']}\t{r['title']}")


# --- issues ---


@issues_app.command("list")
def issues_list(
    list_slug: Annotated[str | None, typer.Option("--list")] = None, as_json: JsonOpt = False
) -> None:
    """List issues, newest first."""
    with transaction() as s:
        rows = list_issues(s, list_slug)
    if as_json:
        out(rows)
        return
    for r in rows:
        typer.echo(f"{r['id']}\t{r['list']}\t{r['status']}\t{r['subject']}")


def _parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        since = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"--since {value!r} is not a date (use YYYY-MM-DD)") from None
    return since if since.tzinfo else since.replace(tzinfo=UTC)


@issues_app.command("compose")
def issues_compose(
    list_slug: ListOpt,
    since: Annotated[str | None, typer.Option("--since", help="Articles since DATE.")] = None,
    max_articles: Annotated[int, typer.Option("--max-articles", min=1)] = 10,
    subject: Annotated[str | None, typer.Option("--subject")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compose a draft issue from the list's next articles; prints its id."""
    from newsletter import issues  # the composer and premailer: only where needed

    r = rt()
    with transaction() as s:
        issue = issues.compose_issue(
            s,
            r.templates,
            list_slug,
            base_url=r.settings.base_url,
            postal_address=r.settings.postal_address,
            since=_parse_since(since),
            max_articles=max_articles,
            subject=subject,
        )
        result = {"id": issue.id, "subject": issue.subject, "status": issue.status.value}
    if as_json:
        out(result)
    else:
        typer.echo(result["id"])


@issues_app.command("preview")
def issues_preview(
    issue_id: int,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory.")] = Path("preview"),
) -> None:
    """Write ID.html, ID.txt and ID.eml as a reader receives them, for a sample reader."""
    from newsletter import issues  # the composer and premailer: only where needed

    with transaction() as s:
        paths = issues.write_preview(s, issue_id, rt().links, out_dir, dkim=rt().dkim_signer)
    for p in paths:
        typer.echo(str(p))


@issues_app.command("send")
def issues_send(
    issue_id: int,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until done.")] = False,
    test_to: Annotated[
        str | None, typer.Option("--test-to", help="Send one test copy; change nothing.")
    ] = None,
) -> None:
    """Freeze the audience and send (through the workers when BROKER_URL is set)."""
    from newsletter import issues  # the composer and premailer: only where needed

    r = rt()
    if test_to:
        _send_test(issue_id, test_to)
        return
    with transaction() as s:
        r.refuse_unsafe_send(s, issue_id)  # the production gate
        batch_ids = issues.begin_send(
            s,
            r.templates,
            issue_id,
            batch_size=r.settings.batch_size,
            base_url=r.settings.base_url,
            postal_address=r.settings.postal_address,
        )
        total = delivery_counts(s, issue_id)["queued"]
    typer.echo(f"issue {issue_id}: {total} recipient(s) in {len(batch_ids)} batch(es)", err=True)
    if _deliver(issue_id, batch_ids, total) == "workers":
        if not wait:
            typer.echo(f"queued; follow with: newsletter issues status {issue_id}")
            return
        _follow(issue_id, total)
    _final(issue_id)


def _send_test(issue_id: int, address: str) -> None:
    from newsletter import issues  # the composer and premailer: only where needed
    from newsletter.transport import Outcome, session_of

    r = rt()
    with transaction() as s:
        copy = issues.sample_copy(s, issue_id, address, r.links, dkim=r.dkim_signer)
    with session_of(r.transport) as conn:
        res = conn.send(copy.sender, copy.recipient, copy.data)
    if res.outcome is not Outcome.SENT:
        raise NewsletterError(f"test send to {copy.recipient} failed: {res.describe()}")
    typer.echo(f"test copy of issue {issue_id} sent to {copy.recipient} ({res.describe()})")


def _deliver(issue_id: int, batch_ids: list[int], total: int) -> str:
    """Hand the batches to the workers, or deliver them in this process with a progress bar
    on a terminal and silence when piped. Returns who delivers them (see Dispatcher)."""
    d = dispatcher()
    progress = None
    if not d.uses_broker and interactive() and total:
        from rich.progress import Progress

        progress = Progress(transient=True)
    with progress if progress is not None else nullcontext():
        on_batch = None
        if progress is not None:
            task = progress.add_task(f"sending issue {issue_id}", total=total)
            on_batch = lambda rep: progress.advance(task, rep.sent + rep.failed)  # noqa: E731
        return d.deliver(issue_id, batch_ids, on_batch=on_batch)


def _follow(issue_id: int, total: int) -> None:
    """Follow progress from the database (the only truth), not from the broker."""
    progress = None
    if interactive():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"sending issue {issue_id}", total=total)
    try:
        while True:
            with transaction() as s:
                st = issue_status(s, issue_id)
            done = total - st["counts"]["queued"] - st["counts"]["claimed"]
            if progress is not None:
                progress.update(task, completed=done)
            if st["status"] != "sending":
                return
            time.sleep(0.5)
    finally:
        if progress is not None:
            progress.stop()


def _final(issue_id: int) -> None:
    with transaction() as s:
        st = issue_status(s, issue_id)
    c = st["counts"]
    typer.echo(
        f"issue {issue_id} {st['status']}: sent {c['sent']}, failed {c['failed']}, "
        f"skipped {c['skipped']}, queued {c['queued'] + c['claimed']}"
    )
    if st["status"] in ("paused", "cancelled"):
        raise NewsletterError(f"issue {issue_id} is {st['status']}: {st['reason']}")


@issues_app.command("status")
def issues_status(issue_id: int, as_json: JsonOpt = False) -> None:
    """Counts per delivery status, and why the issue stopped if it did."""
    with transaction() as s:
        st = issue_status(s, issue_id)  # with its bounce and complaint figures
    if as_json:
        out(st)
        return
    typer.echo(f"issue {st['id']}: {st['status']}  {st['subject']}")
    if st["reason"]:
        typer.echo(f"reason: {st['reason']}")
    typer.echo("  ".join(f"{k} {v}" for k, v in st["counts"].items()) + f"  (total {st['total']})")
    fb = st["feedback"]
    typer.echo(
        f"hard bounces {fb['hard_bounces']} ({fb['hard_bounce_rate']:.2%})  "
        f"soft bounces {fb['soft_bounces']}  complaints {fb['complaints']} "
        f"({fb['complaint_rate']:.2%})  mailed unsubscribes {fb['unsubscribes']}  "
        f"unverified reports {fb['unverified_reports']}"
    )
    if st["last_errors"]:
        typer.echo("last errors:")
    for e in st["last_errors"]:
        typer.echo(f"  delivery {e['delivery']}: {e['error']}")


@issues_app.command("pause")
def issues_pause(issue_id: int) -> None:
    """Stop sending: no new claims, and batches in flight stop within about a second."""
    with transaction() as s:
        pause_issue(s, issue_id)
    typer.echo(f"issue {issue_id} paused; resume with: newsletter issues resume {issue_id}")


@issues_app.command("resume")
def issues_resume(issue_id: int) -> None:
    """Continue a paused issue, or re-enqueue the lost work of a sending one."""
    with transaction() as s:
        rt().refuse_unsafe_send(s, issue_id)  # the production gate
        batch_ids = resume_issue(s, issue_id)
        total = delivery_counts(s, issue_id)["queued"]
    if _deliver(issue_id, batch_ids, total) == "workers":
        typer.echo(f"issue {issue_id} resumed: {len(batch_ids)} batch(es) queued")
        return
    _final(issue_id)


@issues_app.command("cancel")
def issues_cancel(issue_id: int) -> None:
    """Cancel the rest of an issue: deliveries not yet sent are marked cancelled."""
    with transaction() as s:
        n = cancel_issue(s, issue_id)
    typer.echo(f"issue {issue_id} cancelled; {n} delivery(ies) will not be sent")


@issues_app.command("check")
def issues_check(issue_id: int, as_json: JsonOpt = False) -> None:
    """Build the issue for a sample reader and report every problem; exits 1 if any error.
    In production (ENV=prod...) no DKIM, http or localhost links and the placeholder postal
    address are errors, and a send refuses to start while any error stands."""
    from newsletter import checks

    r = rt()
    st = r.settings
    with transaction() as s:
        report = checks.check_issue(
            s,
            issue_id,
            r.links,
            signer=r.dkim_signer,
            postal_address=st.postal_address,
            in_production=st.production,
        )
    if as_json:
        out(report.as_dict())
    else:
        signed = "DKIM-signed" if report.signed else "not signed"
        typer.echo(
            f"issue {issue_id} for {report.reader}: {report.message_bytes} bytes, "
            f"html {report.html_bytes / 1024:.1f} KB, {signed}"
        )
        for problem in report.problems:
            typer.echo(f"  {problem}")
        n = len(report.errors)
        typer.echo(f"{n} problem(s) found" if n else "no problems found")
    if report.errors:
        raise typer.Exit(1)


# --- deliverability: DKIM keys, bounces and complaints ---


@dkim_app.command("keygen")
def dkim_keygen(
    selector: Annotated[str, typer.Option("--selector", help="e.g. news2026")],
    domain: Annotated[str, typer.Option("--domain", help="The signing domain: your From domain.")],
    algorithm: Annotated[str, typer.Option("--algorithm", help="rsa (2048 bits) or ed25519.")] = (
        "rsa"
    ),
    key_file: Annotated[
        Path | None, typer.Option("--out", help="Key file (default SELECTOR.DOMAIN.pem).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a new DKIM private key (mode 0600) and print the DNS TXT record to publish."""
    from newsletter import dkim

    domain, selector = dkim.check_domain(domain), dkim.check_selector(selector)
    path = key_file or Path(f"{selector}.{domain}.pem")
    key = dkim.generate_private_key(algorithm)
    dkim.write_private_key(path, key, overwrite=force)
    name, value = f"{selector}._domainkey.{domain}", dkim.dns_txt_value(key)
    if as_json:
        out({"key_file": str(path.resolve()), "name": name, "type": "TXT", "value": value})
        return
    typer.echo(f"wrote the private key to {path} (mode 0600); publish this TXT record:", err=True)
    typer.echo(dkim.zone_file_line(name, value))
    typer.echo(
        f"then set NEWSLETTER_DKIM_DOMAIN={domain} NEWSLETTER_DKIM_SELECTOR={selector} "
        f"NEWSLETTER_DKIM_KEY_FILE={path.resolve()}",
        err=True,
    )


@bounces_app.command("ingest")
def bounces_ingest(
    paths: Annotated[list[Path], typer.Argument(help=".eml files, or Maildir folders")],
    as_json: JsonOpt = False,
) -> None:
    """Apply returned mail: DSN bounces, ARF complaints, mails to the unsubscribe address."""
    from newsletter import feedback

    r = rt()
    verp = r.verp
    policy = r.feedback_policy
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [p for sub in ("new", "cur") for p in sorted((path / sub).glob("*"))]
            files += found or sorted(p for p in path.iterdir() if p.is_file())
        else:
            files.append(path)
    results = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{file}: {exc.strerror}") from None
        with transaction() as s:
            applied = feedback.ingest_message(
                s, raw, signer=r.links.signer, message_ids=r.message_ids, verp=verp, policy=policy
            )
        for a in applied:
            results.append({"file": str(file), **a.as_dict()})
            if not as_json:
                typer.echo(f"{file}: {a.describe()}")
    if as_json:
        out(results)


# --- processes ---


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
) -> None:
    """Serve the web app: subscribe, confirm, unsubscribe, preferences, archive, /api."""
    import uvicorn

    from newsletter.web.app import create_app

    uvicorn.run(create_app(rt()), host=host, port=port, proxy_headers=True)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(ctx: typer.Context) -> None:
    """Start a Celery worker (extra options go to `celery worker`)."""
    if not get_settings().broker_url:
        raise InvalidInput("NEWSLETTER_BROKER_URL is not set: without it, sends run in-process")
    from worker.celery_app import get_app

    get_app().worker_main(["worker", *ctx.args])


def main() -> None:
    # Usage errors, --help and Ctrl-C are handled by Typer itself; errors a user can fix
    # become one line on stderr with exit status 1, never a traceback.
    try:
        app()
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except DBAPIError as exc:
        typer.echo(f"error: {database_problem(exc)}", err=True)
        sys.exit(1)


def database_problem(exc: DBAPIError) -> str:
    """One line for the operator instead of a driver traceback."""
    text = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return f"the database schema is not up to date ({text}): run `newsletter init`"
    if exc.connection_invalidated or "connect" in text.lower():
        return f"cannot reach the database: {text}"
    return f"database error: {text}"


if __name__ == "__main__":
    main()
