"""Issue 13, finding 6: key rotation must not let erased readers back in.

docs/operations.md tells operators to rotate SECRET_KEY by putting a new key first and, once
the mail signed with the old one has aged out, dropping the old one. Before, the suppression
hash was keyed with the first key, so after the rotation an erased address could be imported
again. Now each purpose has its own derived key, and suppression has a dedicated key of its
own, kept in the database sealed under SECRET_KEY and sealed again under the new key.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import cli_env, run_cli

OLD = "old-secret-key-0123456789abcdefghijklmnop"
NEW = "new-secret-key-0123456789abcdefghijklmnop"
ERASED = "erased.reader@example.org"


def import_report(env: dict[str, str], csv_file: Path) -> dict[str, object]:
    out = run_cli(
        "subscribers", "import", str(csv_file), "--list", "world", "--confirmed", "--json",
        env=env,
    ).stdout  # fmt: skip
    report: dict[str, object] = json.loads(out)
    return report


def test_an_erased_address_stays_out_across_a_key_rotation(pg_url: str, tmp_path: Path) -> None:
    before = cli_env(database_url=pg_url, secret_key=OLD, outbox_dir=str(tmp_path / "out"))
    run_cli(
        "lists", "create", "world", "--name", "World", "--from-address",
        "World Desk <desk@example.org>", env=before,
    )  # fmt: skip
    run_cli("subscribers", "add", ERASED, "--list", "world", "--confirmed", env=before)
    run_cli("subscribers", "erase", ERASED, env=before)
    csv_file = tmp_path / "readers.csv"
    csv_file.write_text(f"email\n{ERASED}\nnew.reader@example.org\n")

    # The rotation as documented: the new key first, the old one still there.
    rotating = {**before, "NEWSLETTER_SECRET_KEY": f"{NEW},{OLD}"}
    report = import_report(rotating, csv_file)
    assert report["imported"] == 1, report  # the new reader only
    refused = run_cli("subscribers", "add", ERASED, "--list", "world", env=rotating, check=False)
    assert refused.returncode != 0 and "erased" in refused.stderr

    # Later the old key is dropped: the erased address is still refused.
    rotated = {**before, "NEWSLETTER_SECRET_KEY": NEW}
    report = import_report(rotated, csv_file)
    assert report["imported"] == 0, report
    refused = run_cli("subscribers", "add", ERASED, "--list", "world", env=rotated, check=False)
    assert refused.returncode != 0 and "erased" in refused.stderr
    listed = run_cli("subscribers", "list", "--list", "world", env=rotated).stdout
    assert ERASED not in listed


def test_dropping_every_key_the_suppressions_were_kept_under_is_refused_clearly(
    pg_url: str, tmp_path: Path
) -> None:
    """Skipping the overlap (old key straight out) would lose the suppressions: refused, with
    the way out, and nothing imported."""
    before = cli_env(database_url=pg_url, secret_key=OLD)
    run_cli(
        "lists", "create", "world", "--name", "World", "--from-address",
        "World Desk <desk@example.org>", env=before,
    )  # fmt: skip
    run_cli("subscribers", "add", ERASED, "--list", "world", "--confirmed", env=before)
    run_cli("subscribers", "erase", ERASED, env=before)
    csv_file = tmp_path / "readers.csv"
    csv_file.write_text(f"email\n{ERASED}\n")

    jumped = {**before, "NEWSLETTER_SECRET_KEY": NEW}
    proc = run_cli(
        "subscribers", "import", str(csv_file), "--list", "world", env=jumped, check=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "SECRET_KEY" in proc.stderr
    assert ERASED not in run_cli("subscribers", "list", "--list", "world", env=before).stdout
