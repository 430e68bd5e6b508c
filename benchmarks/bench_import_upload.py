"""Peak memory of the web server while the operator API imports a big CSV upload (issue 13,
finding 9: a 150 MB upload took 409 MB RSS, the body read into memory whole).

    .venv/bin/python benchmarks/bench_import_upload.py [--megabytes 150]

Runs, one after another, each in a fresh server process (uvicorn, as `newsletter serve`):

 1. reference: the app with the import route as it was (the body read whole with
    `request.body()`, then decoded from memory);
 2. current: the app as it is (the body streamed to a temporary file, parsed from the file),
    with NEWSLETTER_IMPORT_MAX_BYTES raised above the file so that it imports;
 3. refused: the app as it is with the default limit (100 MiB): a larger file gets 413.

Each run POSTs the same CSV (streamed from disk by a separate client process) to
`/api/lists/world/subscribers/import` and reads the server's peak RSS (VmHWM) before it is
stopped. The subscribers are emptied between runs. Needs PostgreSQL
(NEWSLETTER_BENCH_PG_URL; a scratch database is created and dropped).

Prints `name: value` lines (sizes in MB = MiB) and the ratio of each run to the reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import httpx  # noqa: E402
from _million import MB, ROOT, SECRET, cli, cli_env, log, scratch_database  # noqa: E402
from fastapi import Request  # noqa: E402  (module level: the route's annotations are strings)
from sqlalchemy import create_engine, text  # noqa: E402

TOKEN = "bench-admin-token-0123456789"
ROUTE = "/api/lists/{slug}/subscribers/import"
DEFAULT_LIMIT = 100 * MB


def write_csv(path: Path, megabytes: int) -> int:
    """A CSV of about `megabytes` MiB: unique addresses, long names; its row count."""
    target = megabytes * MB
    pad = "x" * 90
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write("email,name\n")
        written = 0
        while written < target:
            chunk = "".join(
                f"reader{rows + i:09d}@example.org,Reader {rows + i} {pad}\n" for i in range(10_000)
            )
            out.write(chunk)
            written += len(chunk)
            rows += 10_000
    return rows


# --- the server process ---------------------------------------------------------------------


def serve(mode: str, port: int) -> None:
    """Run in the server process: the app, with the old import route for `reference`."""
    import uvicorn
    from fastapi.concurrency import run_in_threadpool

    from newsletter import import_rows, imports
    from newsletter.config import Settings
    from newsletter.runtime import Runtime
    from newsletter.web.app import create_app

    rt = Runtime(Settings())  # type: ignore[call-arg]
    app = create_app(rt)
    if mode == "reference":

        def old_import(slug: str, data: bytes) -> dict[str, object]:
            stream = import_rows.read_text_stream(data, "body")
            with rt.sessions() as s, s.begin():
                report = imports.import_csv(
                    s, stream, slug, suppression_key=rt.suppression_key, source="api", name="body"
                )
            return {**report.as_dict(), "summary": report.summary()}

        async def import_whole_body(slug: str, request: Request) -> dict[str, object]:
            data = await request.body()  # the code before the fix
            return await run_in_threadpool(old_import, slug, data)

        app.router.add_api_route(ROUTE, import_whole_body, methods=["POST"])
        app.router.routes.insert(0, app.router.routes.pop())  # matched before the new one
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upload(url: str, path: Path) -> None:
    """Run in the client process: stream the file as the body (Content-Length is set)."""
    size = path.stat().st_size

    def chunks():  # type: ignore[no-untyped-def]
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    with httpx.Client(timeout=3600) as client:
        answer = client.post(
            url,
            content=chunks(),
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": "text/csv",
                "Content-Length": str(size),
            },
        )
    body = answer.json()
    print(f"{answer.status_code} {body.get('imported', body.get('error', ''))}", flush=True)


def run(mode: str, env: dict[str, str], csv: Path) -> dict[str, float | str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port)], env=env, cwd=ROOT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{mode} server did not start") from None
                time.sleep(0.2)
        idle = rss_mb(server.pid, "VmRSS")
        started = time.perf_counter()
        client = subprocess.run(
            [sys.executable, __file__, "--upload", f"{base}{ROUTE.format(slug='world')}",
             "--file", str(csv)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if client.returncode != 0:
            raise RuntimeError(client.stderr[-2000:])
        peak = rss_mb(server.pid, "VmHWM")
        return {"idle": idle, "peak": peak, "seconds": seconds, "answer": client.stdout.strip()}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=150)
    parser.add_argument("--serve", choices=["reference", "current"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--upload")
    parser.add_argument("--file")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port)
    if args.upload:
        return upload(args.upload, Path(args.file))

    with tempfile.TemporaryDirectory() as tmp, scratch_database("newsletter_bench_upload") as db:
        csv = Path(tmp) / "upload.csv"
        rows = write_csv(csv, args.megabytes)
        size = csv.stat().st_size
        print(f"file_mb: {size / MB:.1f}")
        print(f"file_rows: {rows}")
        base = cli_env(
            database_url=db,
            secret_key=SECRET,
            admin_token=TOKEN,
            base_url="https://news.example.org",
        )
        cli("init", env=base)
        cli("lists", "create", "world", "--name", "World", "--from-address", "d@example.org",
            env=base)  # fmt: skip
        engine = create_engine(db)
        results: dict[str, dict[str, float | str]] = {}
        runs = {
            "reference": {**base},
            "current": {**base, "NEWSLETTER_IMPORT_MAX_BYTES": str(size + MB)},
            "refused": {**base, "NEWSLETTER_IMPORT_MAX_BYTES": str(DEFAULT_LIMIT)},
        }
        for mode, env in runs.items():
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE subscriptions, subscribers, events CASCADE"))
            log(f"{mode}: uploading {size / MB:.0f} MB")
            results[mode] = run("reference" if mode == "reference" else "current", env, csv)
        engine.dispose()
    ref = float(results["reference"]["peak"])
    for mode, r in results.items():
        print(f"{mode}_answer: {r['answer']}")
        print(f"{mode}_idle_rss_mb: {float(r['idle']):.0f}")
        print(f"{mode}_peak_rss_mb: {float(r['peak']):.0f}")
        print(f"{mode}_seconds: {float(r['seconds']):.1f}")
        print(f"{mode}_peak_vs_reference: {float(r['peak']) / ref:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
