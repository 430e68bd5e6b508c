"""A page of the subscriber list at a million subscribers: the operator API's
`GET /api/lists/{slug}/subscribers?after=ID&limit=100[&status=S]` (first page and deep
pages, with and without a status filter), `newsletter subscribers list`, and the counts per
status that `lists show` and `GET /api/lists` print. Target: a page in under 50 ms.

    .venv/bin/python benchmarks/bench_list_page.py [--subscribers 1000000] [--requests 20]
        [--no-full-list] [--proposed-indexes]

Needs PostgreSQL (NEWSLETTER_BENCH_PG_URL, default postgresql+psycopg://postgres@127.0.0.1:
5432/postgres: a scratch database newsletter_bench_list_<random> is created and dropped).

The world: list `world` with N confirmed subscribers of which every 1000th has unsubscribed
(1,000 at 1M, spread over the whole list), and list `small` holding every 100th of them
(its subscription ids come after all of `world`'s). The API runs in this process through
FastAPI's TestClient against the app built from settings (create_app(Runtime(settings))).

Prints, per case, the median and p90 of --requests requests in ms, the rows PostgreSQL read
for that page (EXPLAIN ANALYZE of the very statement the product ran: rows returned by every
scan node plus rows its filters removed) and the plan's scan nodes; then list_counts in ms,
`lists show --json` and `subscribers list` as whole commands (process start included), and
the peak RSS of `subscribers list --limit N --json` streaming the whole list (it must not
hold the list in memory). With --proposed-indexes it then creates PROPOSED_INDEXES in the
scratch database and measures the pages again (`with_index_api_*`).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _million import (  # noqa: E402
    BASE_URL,
    SECRET,
    build_world,
    cli,
    cli_env,
    load1,
    log,
    newsletter_argv,
    run_measured,
    scratch_database,
    subscribe_every,
)
from sqlalchemy import create_engine, event, text  # noqa: E402

TARGET_MS = 50
# What keyset pages need at a million (not in the schema: --proposed-indexes adds them to the
# scratch database after the figures without them, and measures again).
PROPOSED_INDEXES = (
    "CREATE INDEX ix_subscriptions_list_status_id ON subscriptions (list_id, status, id)",
    "CREATE INDEX ix_subscriptions_list_id ON subscriptions (list_id, id)",
)
ADMIN_TOKEN = "bench-admin-token"


@contextmanager
def captured_sql(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and parameters) the engine runs inside the block."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def scan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from scan_nodes(child)


def explain(engine: Any, statement: str, params: Any) -> tuple[int, float, str, list[str]]:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement: rows read by its scans, execution ms,
    a one-line summary of its scan nodes, and the plan as text."""
    with engine.connect() as conn:
        raw = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params
        ).scalar_one()
        text_plan = [
            row[0]
            for row in conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params
            ).all()
        ]
    doc = raw if isinstance(raw, list) else json.loads(raw)
    top = doc[0]
    read = 0
    nodes = []
    for node in scan_nodes(top["Plan"]):
        kind = node["Node Type"]
        if "Scan" not in kind:
            continue
        loops = node.get("Actual Loops", 1)
        rows = node.get("Actual Rows", 0) * loops
        removed = node.get("Rows Removed by Filter", 0) + node.get(
            "Rows Removed by Index Recheck", 0
        )
        read += rows + removed
        nodes.append(
            f"{kind} {node.get('Index Name') or node.get('Relation Name', '')}"
            f" rows={rows} removed={removed}"
        )
    return read, float(top["Execution Time"]), "; ".join(nodes), text_plan


def timed(fn: Any, n: int) -> tuple[float, float]:
    """Median and p90 in ms of n calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return statistics.median(times), times[min(n - 1, int(0.9 * n))]


def measure_pages(
    client: Any, engine: Any, cases: list[tuple[str, str, str]], requests: int, prefix: str
) -> list[tuple[str, str]]:
    """Time each page request; EXPLAIN ANALYZE the statements it ran on subscriptions."""
    figures: list[tuple[str, str]] = []
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    worst = 0.0
    for name, slug, query in cases:
        url = f"/api/lists/{slug}/subscribers?limit=100{query}"

        def get(url: str = url) -> Any:
            response = client.get(url, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"GET {url}: {response.status_code} {response.text}")
            return response.json()

        with captured_sql(engine) as seen:
            body = get()
        statements = [s for s in seen if "FROM subscriptions" in s[0]]
        median, p90 = timed(get, requests)
        worst = max(worst, median)
        figures.append((f"{prefix}_{name}_ms", f"{median:.1f} (p90 {p90:.1f}, {url})"))
        figures.append((f"{prefix}_{name}_items", f"{len(body['items'])}"))
        total_read, total_ms, summaries = 0, 0.0, []
        for statement, params in statements:
            read, ms, nodes, plan = explain(engine, statement, params)
            total_read += read
            total_ms += ms
            summaries.append(nodes)
            log(f"{prefix} {name}: {statement} {params}")
            for line in plan:
                log(f"    {line}")
        figures.append(
            (
                f"{prefix}_{name}_rows_read",
                f"{total_read} in {len(statements)} statement(s) (execution {total_ms:.1f} ms)",
            )
        )
        figures.append((f"{prefix}_{name}_plan", " | ".join(summaries)))
    figures.append((f"{prefix}_worst_median_ms", f"{worst:.1f}"))
    return figures


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from newsletter import subscriptions
    from newsletter.config import Settings
    from newsletter.runtime import Runtime
    from newsletter.web.app import create_app

    figures: list[tuple[str, str]] = [("subscribers", str(args.subscribers))]
    with ExitStack() as stack:
        database_url = stack.enter_context(scratch_database("newsletter_bench_list"))
        env = cli_env(database_url=database_url, secret_key=SECRET, base_url=BASE_URL)
        log(f"building the world: {args.subscribers} subscribers in {database_url}")
        build_world(env, database_url, args.subscribers, unsubscribed_every=1000)
        cli(
            "lists",
            "create",
            "small",
            "--name",
            "Small",
            "--from-address",
            "s@example.org",
            env=env,
        )
        small = subscribe_every(database_url, "small", 100)
        log(f"list small: {small} subscriptions")

        settings = Settings(
            database_url=database_url,
            secret_key=SecretStr(SECRET),
            base_url=BASE_URL,
            admin_token=SecretStr(ADMIN_TOKEN),
        )
        rt = Runtime(settings)
        stack.callback(rt.engine.dispose)
        client = stack.enter_context(TestClient(create_app(rt)))
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        deep = int(args.subscribers * 0.9)
        cases = [
            ("first_page", "world", ""),
            ("deep_page", "world", f"&after={deep}"),
            ("status_unsubscribed_first_page", "world", "&status=unsubscribed"),
            ("status_unsubscribed_deep_page", "world", f"&status=unsubscribed&after={deep}"),
            ("status_active_deep_page", "world", f"&status=active&after={deep}"),
            ("status_pending_empty", "world", "&status=pending"),
            ("small_list_first_page", "small", ""),
            ("small_list_deep_page", "small", f"&after={deep}"),
        ]
        figures.append(("load_before", f"{load1():.2f}"))
        figures += measure_pages(client, rt.engine, cases, args.requests, "api")

        # Walk the whole status filter page by page: every subscriber once, then null.
        walked: list[int] = []
        after, pages_ = 0, 0
        started = time.perf_counter()
        while True:
            body = client.get(
                f"/api/lists/world/subscribers?limit=100&status=unsubscribed&after={after}",
                headers=headers,
            ).json()
            walked += [item["id"] for item in body["items"]]
            pages_ += 1
            if body["next_after"] is None:
                break
            after = body["next_after"]
        expected = args.subscribers // 1000
        if len(walked) != expected or len(set(walked)) != expected:
            raise RuntimeError(
                f"walking status=unsubscribed gave {len(walked)} items, "
                f"{len(set(walked))} distinct (want {expected})"
            )
        figures.append(
            (
                "api_walk_unsubscribed",
                f"{len(walked)} subscribers, each once, in {pages_} pages, "
                f"{1000 * (time.perf_counter() - started) / pages_:.1f} ms per page",
            )
        )

        def counts() -> Any:
            with rt.sessions() as s, s.begin():
                return subscriptions.list_counts(s)

        with captured_sql(rt.engine) as seen:
            result = counts()
        median, p90 = timed(counts, 5)
        figures.append(("list_counts_ms", f"{median:.1f} (p90 {p90:.1f})"))
        figures.append(("list_counts", "; ".join(f"{m.slug} {json.dumps(c)}" for m, c in result)))
        for statement, params in seen:
            if "subscriptions" in statement:
                read, ms, nodes, plan = explain(rt.engine, statement, params)
                figures.append(("list_counts_rows_read", f"{read} (execution {ms:.1f} ms)"))
                figures.append(("list_counts_plan", nodes))
                log(f"list_counts: {statement}")
                for line in plan:
                    log(f"    {line}")
        median, p90 = timed(lambda: client.get("/api/lists", headers=headers), 5)
        figures.append(("api_lists_ms", f"{median:.1f} (p90 {p90:.1f})"))

        for name, argv in (
            ("cli_lists_show_json", newsletter_argv("lists", "show", "--json")),
            (
                "cli_subscribers_list_unsubscribed_json",
                newsletter_argv(
                    "subscribers", "list", "--list", "world", "--status", "unsubscribed", "--json"
                ),
            ),
            ("cli_imports_only", [sys.executable, "-c", "import newsletter.cli"]),
        ):
            result_ = run_measured(argv, env)
            if result_.returncode != 0:
                raise RuntimeError(f"{name} exited {result_.returncode}: {result_.stderr}")
            figures.append(
                (name, f"{1000 * result_.seconds:.0f} ms, peak {result_.maxrss_kb / 1024:.1f} MB")
            )
        if args.full_list:
            argv = newsletter_argv(
                "subscribers", "list", "--list", "world", "--limit", str(args.subscribers)
            )
            argv += ["--json"]
            output = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "list.json"
            result_ = run_measured(argv, env, stdout_path=output)
            if result_.returncode != 0:
                raise RuntimeError(f"subscribers list exited {result_.returncode}")
            # Count "email" keys a megabyte at a time, carrying the last 6 bytes over (one
            # less than the key): a key cut by a chunk boundary still counts, and once.
            lines, tail = 0, b""
            with open(output, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    data = tail + chunk
                    lines += data.count(b'"email"')
                    tail = data[-6:]
            figures.append(
                (
                    "cli_subscribers_list_whole_list_json",
                    f"{lines} subscribers in {result_.seconds:.1f} s, "
                    f"peak {result_.maxrss_kb / 1024:.1f} MB",
                )
            )
        if args.proposed_indexes:
            engine = create_engine(database_url)
            with engine.begin() as conn:
                for ddl in PROPOSED_INDEXES:
                    started = time.perf_counter()
                    conn.execute(text(ddl))
                    log(f"{ddl}: {time.perf_counter() - started:.1f} s")
                conn.execute(text("ANALYZE subscriptions"))
            engine.dispose()
            figures += measure_pages(client, rt.engine, cases, args.requests, "with_index_api")
        figures.append(("load_after", f"{load1():.2f}"))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument(
        "--no-full-list",
        dest="full_list",
        action="store_false",
        help="skip streaming the whole list through `subscribers list` (slow)",
    )
    parser.add_argument(
        "--proposed-indexes",
        action="store_true",
        help="then add the indexes of PROPOSED_INDEXES and measure the pages again",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        figures = run(args)
    except RuntimeError as exc:
        print(f"bench_list_page: error: {exc}", file=sys.stderr)
        return 1
    for name, value in figures:
        print(f"{name}: {value}")
    print(f"target_ms: {TARGET_MS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
