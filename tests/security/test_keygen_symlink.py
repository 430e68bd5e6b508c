"""Issue 13, finding 9: `dkim keygen --force` wrote the private key through a symlink.

Anyone who could plant `key.pem -> /some/file/of/the/operator` had that file overwritten
(and a private key written where they could read it). The key file is now written to a
temporary file beside it and renamed over the name: a symlink there is replaced, never
followed, and what it pointed at is left as it was.
"""

from __future__ import annotations

import stat
from pathlib import Path

from tests.conftest import cli_env, run_cli

KEYGEN = ("dkim", "keygen", "--selector", "news", "--domain", "example.org")


def test_keygen_force_never_writes_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("the operator's own file\n")
    victim.chmod(0o644)
    keys = tmp_path / "keys"
    keys.mkdir()
    link = keys / "news.example.org.pem"
    link.symlink_to(victim)

    proc = run_cli(*KEYGEN, "--out", str(link), "--force", env=cli_env(), cwd=tmp_path)

    assert victim.read_text() == "the operator's own file\n", "keygen wrote through the symlink"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not link.is_symlink()
    assert link.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert "news._domainkey.example.org" in proc.stdout
    assert sorted(p.name for p in keys.iterdir()) == [link.name], "a temporary file was left"


def test_keygen_without_force_refuses_an_existing_name_even_a_dangling_symlink(
    tmp_path: Path,
) -> None:
    link = tmp_path / "news.example.org.pem"
    link.symlink_to(tmp_path / "not-there")
    proc = run_cli(*KEYGEN, "--out", str(link), env=cli_env(), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "already exists (use --force to replace it)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "not-there").exists()
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [link.name]
