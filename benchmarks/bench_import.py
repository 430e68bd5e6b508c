"""`newsletter subscribers import` of a generated CSV into PostgreSQL, with full validation,
as an operator runs it; and, as the reference in the same run, `psql \\copy` of the same file
into a plain table with no index, key or check.

    .venv/bin/python benchmarks/bench_import.py [--rows 1000000] [--admin-url URL]

A scratch database newsletter_bench_import_<random> is created (schema by the migrations, one
list, some erased addresses) and dropped afterwards. The import runs as a subprocess, the real
CLI (`python -m newsletter.cli subscribers import FILE --list world --confirmed --json`), so
its wall time includes the interpreter's start and its peak RSS (ru_maxrss from wait4 on that
very process, i.e. VmHWM) is what an operator's machine sees.

The file is varied on purpose: a few dozen mail providers and thousands of company domains
(some in upper case, some IDN, which take email_validator's slow path), names in several
scripts, some quoted with commas, an attributes column that is sometimes empty. About 1 row
in 10,000 is bad in each of three ways (an invalid address, a repeat of an earlier address
with its domain in other case, an address that was erased); the import must reject exactly
those, which this script checks.

Prints `name: value` lines:
    import_rows                  data rows in the file
    import_rejected_expected     bad rows put in on purpose (all must be rejected)
    import_csv_mb                file size
    import_seconds               wall time of the CLI process, start to exit
    import_rows_per_s            import_rows / import_seconds
    import_peak_rss_mb           peak RSS of the CLI process, or of a helper if larger (MiB)
    import_helpers               helper processes the CLI reads a file this size with
    import_empty_file_seconds    the same command on a header-only file: start-up and teardown
    import_empty_file_peak_rss_mb  its peak RSS: what the CLI costs before any row
    psql_copy_seconds            psql \\copy of the same file into a plain table
    psql_copy_rows_per_s
    import_ratio_to_copy         import_rows_per_s / psql_copy_rows_per_s
    import_target_rows_per_s     50000
    import_meets_target          yes or no
    load_before, load_after      1-minute load average (the machine is shared: note it)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from newsletter import import_rows, subscriptions  # noqa: E402
from newsletter.addresses import normalize_email  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from newsletter.models import Suppression  # noqa: E402

TARGET_ROWS_PER_S = 50_000
SECRET = "bench-import-secret"  # NEWSLETTER_SECRET_KEY of the CLI: the suppression key
BAD_EVERY = 10_000  # one row in this many is bad, in each of the three ways

PROVIDERS = [
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "gmx.de", "web.de",
    "orange.fr", "free.fr", "libero.it", "yandex.ru", "mail.ru", "qq.com", "163.com",
    "naver.com", "protonmail.com", "aol.com", "t-online.de", "btinternet.com", "seznam.cz",
    "wp.pl", "telenet.be", "bluewin.ch", "uol.com.br", "rediffmail.com",
]  # fmt: skip
IDN_DOMAINS = ["bücher.de", "münchen-post.de", "résumé.fr", "ørsted-mail.dk", "пример.рф"]
FIRST = [
    "anna", "ben", "chloé", "david", "elif", "françois", "grace", "hiro", "ivan", "józsef",
    "karin", "luis", "mária", "nils", "olga", "pedro", "quinn", "rahul", "søren", "tomás",
    "ulla", "vera", "wei", "xavier", "yusuf", "zoë", "łukasz", "maría", "ahmed", "mei",
]  # fmt: skip
LAST = [
    "smith", "müller", "garcía", "rossi", "dubois", "kowalski", "nielsen", "novák", "tanaka",
    "kim", "singh", "silva", "ivanova", "o'brien", "van der berg", "nguyen", "öztürk",
    "papadopoulos", "johansson", "lee",
]  # fmt: skip
NON_LATIN = ["王伟", "李娜", "Мария Иванова", "Δημήτρης", "محمد", "佐藤 花子", "김민준", "יעל"]
CITIES = ["Oslo", "Zürich", "São Paulo", "Kraków", "東京", "Reykjavík", "Lagos", "Austin", ""]
ASCII = str.maketrans("éçáóúíöüøłñëő'", "ecaouiouolneo-", " ")


def write_csv(path: Path, rows: int, seed: int = 7) -> tuple[int, list[str]]:
    """Write the file; return (bad rows put in, addresses to erase before the import)."""
    rnd = random.Random(seed)
    companies = [f"{rnd.choice(LAST).translate(ASCII)}-{n}.example.com" for n in range(5000)]
    bad = 0
    erase: list[str] = []
    written: list[str] = []  # a sample of earlier addresses, to repeat
    with open(path, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["email", "name", "city"])
        for i in range(rows):
            first, last = rnd.choice(FIRST), rnd.choice(LAST)
            kind = rnd.random()
            if kind < 0.55:
                domain = rnd.choice(PROVIDERS)
            elif kind < 0.999:
                domain = rnd.choice(companies)
            else:
                domain = rnd.choice(IDN_DOMAINS)
            if rnd.random() < 0.05:
                domain = domain.upper()
            user, family = first.translate(ASCII), last.translate(ASCII)
            local = rnd.choice(
                [
                    f"{user}.{family}{i}",
                    f"{user[0]}{family}{i}",
                    f"{user}_{i}",
                    f"{family}.{user}+news{i}",
                    f"{user.title()}.{family.title()}.{i}",
                ]
            )
            email = f"{local}@{domain}"
            name = rnd.choice(
                [
                    f"{first.title()} {last.title()}",
                    f"{last.title()}, {first.title()}",  # quoted: it has a comma
                    rnd.choice(NON_LATIN),
                    "",
                ]
            )
            if i % BAD_EVERY == BAD_EVERY - 1:
                bad += 1
                email = rnd.choice(["not-an-address", f"{first}@", f"{first}@@x.org", "a@b"])
            elif i % BAD_EVERY == BAD_EVERY // 2 and written:
                bad += 1
                earlier = rnd.choice(written)
                who, _, host = earlier.rpartition("@")
                email = f"{who}@{host.swapcase()}"  # same address: domains are case-blind
            elif i % BAD_EVERY == BAD_EVERY // 4:
                bad += 1
                erase.append(email)
            elif i % 997 == 0 and len(written) < 10_000 and domain.isascii():
                written.append(email)
            out.writerow([email, name, rnd.choice(CITIES)])
    return bad, erase


def run_cli(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run the CLI; return (wall seconds, peak RSS in MiB, stdout). Output goes to files, not
    pipes: a full pipe would block the child while this process waits for it."""
    started = time.perf_counter()
    with open(log, "w+b") as out, open(log.with_suffix(".err"), "w+b") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"newsletter {' '.join(args)} failed ({proc.returncode}):\n{stderr}")
    return seconds, usage.ru_maxrss / 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    name = f"newsletter_bench_import_{uuid.uuid4().hex[:6]}"
    admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(NEWSLETTER_DATABASE_URL=url, NEWSLETTER_SECRET_KEY=SECRET, PGCLIENTENCODING="UTF8")
    try:
        engine = make_engine(url)
        upgrade(engine)
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "readers.csv"
            expected_bad, erase = write_csv(csv_path, args.rows)
            size_mb = csv_path.stat().st_size / 1e6
            empty = Path(tmp) / "empty.csv"
            empty.write_text("email,name,city\n")
            with make_sessionmaker(engine)() as s, s.begin():
                subscriptions.create_list(s, "world", "World", "desk@example.org")
                # Erased addresses: those of the file, and as many others as erasures pile up.
                hashes = [subscriptions.suppression_hash(normalize_email(e), SECRET) for e in erase]
                hashes += [uuid.uuid4().hex * 2 for _ in range(1000)]
                s.add_all(Suppression(email_hash=h, reason="erased") for h in hashes)
            engine.dispose()

            command = ["subscribers", "import", "--list", "world", "--confirmed", "--json"]
            empty_seconds, empty_mb, _out = run_cli([*command, str(empty)], env, Path(tmp) / "e")
            ours, peak_mb, stdout = run_cli([*command, str(csv_path)], env, Path(tmp) / "log")
            report = json.loads(stdout)
            good = args.rows - expected_bad
            if (report["imported"], len(report["rejected"])) != (good, expected_bad):
                raise SystemExit(
                    f"expected {good} imported and {expected_bad} rejected, got "
                    f"{report['imported']} and {len(report['rejected'])}"
                )

            u = make_url(url)
            psql_target = f"host={u.host} port={u.port or 5432} user={u.username} dbname={name}"
            subprocess.run(
                [
                    "psql",
                    psql_target,
                    "-q",
                    "-c",
                    "CREATE TABLE plain_copy (a text, b text, c text)",
                ],
                check=True,
                env=env,
            )
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
                env=env,
            )
            reference = time.perf_counter() - started
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=:n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    ours_rate = args.rows / ours
    copy_rate = args.rows / reference
    print(f"import_rows: {args.rows}")
    print(f"import_rejected_expected: {expected_bad}")
    print(f"import_csv_mb: {size_mb:.1f}")
    print(f"import_seconds: {ours:.2f}")
    print(f"import_rows_per_s: {ours_rate:.0f}")
    print(f"import_peak_rss_mb: {peak_mb:.0f}")
    print(f"import_helpers: {import_rows.import_helpers(int(size_mb * 1e6))}")
    print(f"import_empty_file_seconds: {empty_seconds:.2f}")
    print(f"import_empty_file_peak_rss_mb: {empty_mb:.0f}")
    print(f"psql_copy_seconds: {reference:.2f}")
    print(f"psql_copy_rows_per_s: {copy_rate:.0f}")
    print(f"import_ratio_to_copy: {ours_rate / copy_rate:.3f}")
    print(f"import_target_rows_per_s: {TARGET_ROWS_PER_S}")
    print(f"import_meets_target: {'yes' if ours_rate >= TARGET_ROWS_PER_S else 'no'}")
    print(f"load_before: {load_before:.2f}")
    print(f"load_after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
