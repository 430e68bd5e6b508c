"""Cost of building one recipient's message bytes for a 10-article digest, on one core.

    .venv/bin/python benchmarks/bench_message.py [--builds N] [--repeats R]

Prints plain `name: value` lines:
    compile_ms                      one CompiledMessage.compile (per issue)
    build_us_per_message            median over R runs of N builds (varied recipients)
    build_with_signed_links_us_per_message
                                    the same plus signing the reader's unsubscribe and
                                    preferences links and MACing the delivery's
                                    Message-ID, as a worker does per reader
    target_us_per_message           50 (issue 6)
    message_bytes                   size of one built message
    emailmessage_us_per_message     the same message through email.message.EmailMessage
                                    + as_bytes(policy=SMTP), the reference
    speedup_vs_emailmessage         the ratio of the two
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_compose import sample_articles, sample_context  # noqa: E402

from newsletter import provenance  # noqa: E402
from newsletter.compose import make_environment, render_issue  # noqa: E402
from newsletter.keys import derive_all  # noqa: E402
from newsletter.message import (  # noqa: E402
    CompiledMessage,
    IssueMessageSpec,
    Recipient,
    fill_placeholders,
    format_date,
    make_message_id,
)
from newsletter.outgoing import Links  # noqa: E402
from newsletter.placeholders import Markers  # noqa: E402
from newsletter.provenance import MessageIds  # noqa: E402
from newsletter.tokens import LinkSigner  # noqa: E402

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

NAMES = ("Ada Lovelace", "José Ñúñez", None, "李小龍", 'Bob "The Builder" O\'Neil', "Grace Hopper")
BASE = "https://news.example.org"


def recipients(count: int) -> list[Recipient]:
    people = []
    for number in range(count):
        token = f"eyJzIjo{number:08d}.Zk3aQ.abcDEFghiJKLmnoPQRstu-vwxYZ_{number}"
        people.append(
            Recipient(
                email=f"reader{number}@example.com",
                name=NAMES[number % len(NAMES)],
                unsubscribe_url=f"{BASE}/unsubscribe/{token}",
                preferences_url=f"{BASE}/preferences/{token}",
                unsubscribe_mailto=f"mailto:unsubscribe@example.org?subject=unsubscribe%20{token}",
                message_id=make_message_id(number, "a1b2c3d4e5f6", "example.org"),
            )
        )
    return people


def build_with_emailmessage(spec: IssueMessageSpec, recipient: Recipient, date: str) -> bytes:
    message = EmailMessage()
    message["From"] = spec.from_address
    message["To"] = Address(recipient.name or "", addr_spec=recipient.email)
    message["Subject"] = spec.subject
    message["Date"] = date
    message["Message-ID"] = recipient.message_id
    if spec.reply_to:
        message["Reply-To"] = spec.reply_to
    message["List-Id"] = spec.list_id
    message["List-Unsubscribe"] = f"<{recipient.unsubscribe_url}>, <{recipient.unsubscribe_mailto}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message["Precedence"] = "bulk"
    values = {
        "name": recipient.name,
        "unsubscribe_url": recipient.unsubscribe_url,
        "preferences_url": recipient.preferences_url,
        "markers": spec.markers,
    }
    message.set_content(fill_placeholders(spec.text, html=False, **values))  # type: ignore[arg-type]
    message.add_alternative(
        fill_placeholders(spec.html, html=True, **values),  # type: ignore[arg-type]
        subtype="html",
    )
    return message.as_bytes(policy=SMTP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-builds", type=int, default=200)
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
    start = time.perf_counter()
    compiled = CompiledMessage.compile(spec)
    compile_ms = (time.perf_counter() - start) * 1000

    people = recipients(args.builds)
    date = format_date()
    build = compiled.build
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for person in people:
            build(person, date=date)
        runs.append((time.perf_counter() - start) / len(people) * 1e6)
    ours = statistics.median(runs)

    # What a worker does per reader (build_for): sign the reader's links (HMAC-SHA256
    # per purpose), MAC the delivery's Message-ID (newsletter.provenance), then substitute
    # and build.
    links = Links(
        BASE,
        LinkSigner(["bench-secret-key"]),
        MessageIds(derive_all(["bench-secret-key"], provenance.PURPOSE)),
    )
    tokens = [f"tok{number:020d}" for number in range(len(people))]
    linked_runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for number, (person, token) in enumerate(zip(people, tokens, strict=True)):
            unsubscribe, preferences, mailto = links.reader("desk@example.org", token)
            tag = links.message_ids.tag(number, "a1b2c3d4e5f6")
            build(
                Recipient(
                    email=person.email,
                    name=person.name,
                    unsubscribe_url=unsubscribe,
                    preferences_url=preferences,
                    unsubscribe_mailto=mailto,
                    message_id=make_message_id(number, tag, "example.org"),
                ),
                date=date,
            )
        linked_runs.append((time.perf_counter() - start) / len(people) * 1e6)
    with_links = statistics.median(linked_runs)

    reference_people = people[: args.reference_builds]
    reference_runs = []
    for _ in range(3):
        start = time.perf_counter()
        for person in reference_people:
            build_with_emailmessage(spec, person, date)
        reference_runs.append((time.perf_counter() - start) / len(reference_people) * 1e6)
    reference = statistics.median(reference_runs)

    print(f"compile_ms: {compile_ms:.1f}")
    print(f"html_transfer_encoding: {compiled.html_transfer_encoding}")
    print(f"build_us_per_message: {ours:.1f}")
    print(f"build_messages_per_second: {1e6 / ours:.0f}")
    print(f"build_with_signed_links_us_per_message: {with_links:.1f}")
    print("target_us_per_message: 50")
    print(f"message_bytes: {len(build(people[0], date=date))}")
    print(f"emailmessage_us_per_message: {reference:.1f}")
    print(f"speedup_vs_emailmessage: {reference / ours:.0f}")


if __name__ == "__main__":
    main()
