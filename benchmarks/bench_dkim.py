"""DKIM signing rate on one core: ours (cryptography/OpenSSL) against dkimpy, same run.

    .venv/bin/python benchmarks/bench_dkim.py [--messages N] [--repeats R] [--dkimpy N]

Every rate is messages per CPU second of this process (time.process_time), the best of
--repeats runs, so that other work on a shared machine counts against it as little as
possible; wall-clock rates are printed too. The message is the 10-article digest of
bench_message.py (about 42 KB), one recipient each.

Prints plain `name: value` lines:
    openssl_rsa2048_signs_per_s        the bare private-key operation: the ceiling
    unsigned_build_per_s               CompiledMessage.build without DKIM (the floor)
    ours_rsa2048_signed_build_per_s    build + relaxed canonicalization + RSA-2048 signature
    ours_rsa2048_sign_only_per_s       DkimSigner.sign on an already built message
    ours_ed25519_signed_build_per_s    the same with an Ed25519 key
    dkimpy_rsa2048_signs_per_s         dkim.sign() on the same message (pure-Python RSA)
    dkimpy_ed25519_signs_per_s         dkim.sign() with Ed25519 (PyNaCl), when installed
    speedup_vs_dkimpy_rsa              ours_rsa2048_signed_build / dkimpy_rsa2048
    verified_by_dkimpy                 every signature of a sample verifies with dkimpy
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dkim as dkimpy  # noqa: E402
from bench_compose import sample_articles, sample_context  # noqa: E402
from bench_message import recipients  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

from newsletter.compose import make_environment, render_issue  # noqa: E402
from newsletter.dkim import DkimSigner, generate_private_key, private_key_pem  # noqa: E402
from newsletter.message import CompiledMessage, IssueMessageSpec, format_date  # noqa: E402
from newsletter.placeholders import Markers  # noqa: E402

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers


def shown(figures: tuple[float, float]) -> str:
    return f"{figures[0]:.0f} (wall {figures[1]:.0f})"


def rate(work: Callable[[], int], repeats: int) -> tuple[float, float]:
    """(best per-CPU-second rate, best wall-clock rate) of `repeats` runs of `work`, which
    returns the number of operations it did. The best run is the one least disturbed by
    other processes on a shared machine (as timeit reports its minimum)."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        done = work()
        c1, w1 = time.process_time(), time.perf_counter()
        cpu.append(done / max(c1 - c0, 1e-9))
        wall.append(done / max(w1 - w0, 1e-9))
    return max(cpu), max(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dkimpy", type=int, default=60, help="messages signed by dkimpy")
    args = parser.parse_args()

    env = make_environment(ROOT / "templates")
    issue = render_issue(sample_context(sample_articles(10)), env)
    spec = IssueMessageSpec(
        markers=MARKERS,
        subject=issue.subject,
        from_address="World Desk <desk@example.org>",
        reply_to=None,
        list_id='"World Digest" <world.example.org>',
        html=issue.html,
        text=issue.text,
        message_id_domain="example.org",
    )
    people = recipients(args.messages)
    date = format_date()
    rsa_key = generate_private_key("rsa")
    ed_key = generate_private_key("ed25519")
    rsa_signer = DkimSigner(rsa_key, domain="example.org", selector="news")
    ed_signer = DkimSigner(ed_key, domain="example.org", selector="news-ed")
    unsigned = CompiledMessage.compile(spec)
    signed_rsa = unsigned.signed_by(rsa_signer)
    signed_ed = unsigned.signed_by(ed_signer)
    built = [unsigned.build(p, date=date) for p in people]
    assert isinstance(rsa_key, rsa.RSAPrivateKey)

    def openssl() -> int:
        pad, digest = padding.PKCS1v15(), hashes.SHA256()
        for _ in range(len(people)):
            rsa_key.sign(b"x" * 900, pad, digest)
        return len(people)

    def build_with(compiled: CompiledMessage) -> Callable[[], int]:
        def work() -> int:
            build = compiled.build
            for person in people:
                build(person, date=date)
            return len(people)

        return work

    def sign_only() -> int:
        for data in built:
            rsa_signer.sign(data)
        return len(built)

    sample = built[: args.dkimpy]

    def dkimpy_with(pem: bytes, algorithm: bytes) -> Callable[[], int]:
        def work() -> int:
            for data in sample:
                dkimpy.sign(
                    data,
                    b"news",
                    b"example.org",
                    pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=algorithm,
                    include_headers=[h.encode() for h in ("From", "To", "Subject", "Date")],
                )
            return len(sample)

        return work

    figures: dict[str, str] = {}
    figures["openssl_rsa2048_signs_per_s"] = shown(rate(openssl, args.repeats))
    figures["unsigned_build_per_s"] = shown(rate(build_with(unsigned), 1))
    ours_rsa = rate(build_with(signed_rsa), args.repeats)
    figures["ours_rsa2048_signed_build_per_s"] = shown(ours_rsa)
    figures["ours_rsa2048_sign_only_per_s"] = shown(rate(sign_only, 1))
    figures["ours_ed25519_signed_build_per_s"] = shown(rate(build_with(signed_ed), args.repeats))
    theirs_rsa = rate(dkimpy_with(private_key_pem(rsa_key), b"rsa-sha256"), 1)
    figures["dkimpy_rsa2048_signs_per_s"] = shown(theirs_rsa)
    try:
        import nacl.signing  # noqa: F401

        raw = ed_key.private_bytes_raw()
        import base64

        theirs_ed = rate(dkimpy_with(base64.b64encode(raw), b"ed25519-sha256"), 1)
        figures["dkimpy_ed25519_signs_per_s"] = shown(theirs_ed)
    except ImportError:
        figures["dkimpy_ed25519_signs_per_s"] = "n/a (PyNaCl not installed)"
    figures["speedup_vs_dkimpy_rsa"] = f"{ours_rsa[0] / theirs_rsa[0]:.1f}"

    records = {b"news": rsa_signer.dns_txt().encode(), b"news-ed": ed_signer.dns_txt().encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.split(b".")[0]]

    check = [signed_rsa.build(p, date=date) for p in people[:20]]
    check += [signed_ed.build(p, date=date) for p in people[:20]]
    figures["verified_by_dkimpy"] = str(all(dkimpy.verify(m, dnsfunc=dnsfunc) for m in check))
    for name, value in figures.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
