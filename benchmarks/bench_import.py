"""Import a generated CSV of N subscribers into PostgreSQL with full validation, and, as the
reference in the same run, `psql \\copy` the same file into a plain table.

    .venv/bin/python benchmarks/bench_import.py [--rows 100000] [--admin-url URL]

Prints rows per second for both and their ratio. Uses a scratch database it drops after.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newsletter import subscriptions  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, upgrade  # noqa: E402


def write_csv(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("email,name,city\n")
        for i in range(rows):
            fh.write(f"reader{i}@example{i % 97}.org,Reader {i},City {i % 13}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    name = f"newsletter_bench_import_{uuid.uuid4().hex[:6]}"
    admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        engine = make_engine(url)
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "readers.csv"
            write_csv(csv_path, args.rows)
            size_mb = csv_path.stat().st_size / 1e6
            with sessions() as s, s.begin():
                subscriptions.create_list(s, "world", "World", "desk@example.org")

            started = time.perf_counter()
            with sessions() as s, s.begin():
                data = csv_path.read_bytes()
                report = subscriptions.import_csv(
                    s,
                    subscriptions.read_text_stream(data, "readers.csv"),
                    "world",
                    confirmed=True,
                    suppression_key="bench",
                )
            ours = time.perf_counter() - started
            assert report.imported == args.rows, report.summary()

            u = make_url(url)
            psql_target = f"host={u.host} port={u.port or 5432} user={u.username} dbname={name}"
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE plain_copy (email text, name text, city text)"))
            started = time.perf_counter()
            subprocess.run(
                [
                    "psql",
                    psql_target,
                    "-q",
                    "-c",
                    f"\\copy plain_copy FROM '{csv_path}' WITH (FORMAT csv, HEADER true)",
                ],
                check=True,
            )
            reference = time.perf_counter() - started
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=:n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    out = io.StringIO()
    out.write(f"import_rows: {args.rows}\n")
    out.write(f"import_csv_mb: {size_mb:.1f}\n")
    out.write(f"import_seconds: {ours:.2f}\n")
    out.write(f"import_rows_per_s: {args.rows / ours:.0f}\n")
    out.write(f"psql_copy_seconds: {reference:.2f}\n")
    out.write(f"psql_copy_rows_per_s: {args.rows / reference:.0f}\n")
    out.write(f"import_ratio_to_copy: {reference / ours:.3f}\n")
    print(out.getvalue(), end="")


if __name__ == "__main__":
    main()
