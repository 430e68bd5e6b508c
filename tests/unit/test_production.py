"""The production gate's rules (pure): every row of each table, and the boundaries."""

from __future__ import annotations

import pytest

from newsletter import checks, production
from newsletter.production import (
    DEV_SECRET_KEY,
    MIN_KEY_BYTES,
    PLACEHOLDER_POSTAL_ADDRESS,
    ProductionError,
    check_settings,
    is_local_host,
    is_production,
    key_problems,
    url_problems,
)

GOOD = "x" * MIN_KEY_BYTES
GOOD2 = "y" * 40


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("production", True),
        ("Production", True),
        ("PRODUCTION-eu", True),
        ("prod", True),
        (" prod ", True),
        ("Prod-us", True),
        ("development", False),
        ("staging", False),
        ("", False),
        ("pro", False),
        ("preprod", False),
        ("test", False),
    ],
)
def test_is_production(env: str, expected: bool) -> None:
    assert is_production(env) is expected


@pytest.mark.parametrize("raw", ["", ",", ", ,", " ", " , , "])
@pytest.mark.parametrize("in_production", [False, True])
def test_no_key_at_all_is_refused_everywhere(raw: str, in_production: bool) -> None:
    assert key_problems(raw, production=in_production) == [
        "NEWSLETTER_SECRET_KEY holds no key (it is empty or only commas and spaces)"
    ]


@pytest.mark.parametrize(
    "raw", [DEV_SECRET_KEY, "short", f"{GOOD},,{GOOD2}", f"{DEV_SECRET_KEY},{GOOD}"]
)
def test_outside_production_any_key_will_do(raw: str) -> None:
    assert key_problems(raw, production=False) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GOOD, []),
        (f"{GOOD},{GOOD2}", []),
        (f" {GOOD} , {GOOD2} ", []),
        ("x" * (MIN_KEY_BYTES - 1), ["NEWSLETTER_SECRET_KEY is shorter than 32 bytes"]),
        ("\u00e9" * 16, []),  # 32 bytes in UTF-8, 16 characters
        ("\u00e9" * 15 + "x", ["NEWSLETTER_SECRET_KEY is shorter than 32 bytes"]),
        (DEV_SECRET_KEY, ["NEWSLETTER_SECRET_KEY is a development or published default key"]),
        (DEV_SECRET_KEY.upper(), ["is a development or published default key"]),
        (f"{DEV_SECRET_KEY},{GOOD}", ["key 1 of 2 in NEWSLETTER_SECRET_KEY is a development"]),
        (f"{GOOD},{DEV_SECRET_KEY}", ["key 2 of 2 in NEWSLETTER_SECRET_KEY is a development"]),
        (f"{GOOD},,{GOOD2}", ["key 2 of 3 in NEWSLETTER_SECRET_KEY is empty"]),
        (f"{GOOD},", ["key 2 of 2 in NEWSLETTER_SECRET_KEY is empty"]),
        (f",{GOOD}", ["key 1 of 2 in NEWSLETTER_SECRET_KEY is empty"]),
        (
            f"short,{DEV_SECRET_KEY}",
            ["key 1 of 2 in NEWSLETTER_SECRET_KEY is shorter", "key 2 of 2 in NEWSLETTER_SECRET_"],
        ),
    ],
)
def test_production_keys(raw: str, expected: list[str]) -> None:
    problems = key_problems(raw, production=True)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert start in problem
        assert raw.strip(", ") not in problem or not raw.strip(", ")


def test_every_known_key_is_refused_at_any_length() -> None:
    for key in production.KNOWN_KEYS:
        assert "default key" in key_problems(key, production=True)[0]


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("app.localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", True),
        ("::", True),
        ("news.example.org", False),
        ("localhost.example.org", False),
        ("mylocalhost", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("2001:db8::1", False),
    ],
)
def test_is_local_host(host: str, local: bool) -> None:
    assert is_local_host(host) is local


@pytest.mark.parametrize(
    ("url", "reasons"),
    [
        ("https://news.example.org/x", []),
        ("HTTPS://news.example.org", []),
        ("http://news.example.org/x", ["not https"]),
        ("HTTP://news.example.org", ["not https"]),
        ("http://localhost:8000/unsubscribe/t", ["not https", "on localhost"]),
        ("https://localhost/x", ["on localhost"]),
        ("https://127.0.0.1:8443", ["on localhost"]),
        ("https://[::1]:8000/", ["on localhost"]),
        ("mailto:desk@example.org", []),
        ("#top", []),
        ("https://[bad", []),
    ],
)
def test_url_problems(url: str, reasons: list[str]) -> None:
    assert url_problems(url) == reasons


def test_postal_address_rules() -> None:
    assert production.postal_address_problems("World Desk, 1 Real Road, Leeds") == []
    assert "placeholder" in production.postal_address_problems(PLACEHOLDER_POSTAL_ADDRESS)[0]
    spaced = "  newsletter desk,  1 Example Street,\n Example City "
    assert production.is_placeholder_postal_address(spaced)
    assert "empty" in production.postal_address_problems("  ")[0]
    assert production.carries_placeholder_postal_address(f"Footer: {spaced} -- bye")
    assert not production.carries_placeholder_postal_address("World Desk, 1 Real Road")


def test_check_settings_names_every_problem_on_one_line_in_production_only() -> None:
    ok = {"secret_key": GOOD, "base_url": "https://n.example.org", "postal_address": "A, B"}
    check_settings(env="production", **ok)
    bad = {
        "secret_key": DEV_SECRET_KEY,
        "base_url": "http://localhost:8000",
        "postal_address": PLACEHOLDER_POSTAL_ADDRESS,
    }
    check_settings(env="development", **bad)
    with pytest.raises(ProductionError) as refused:
        check_settings(env="Prod", **bad)
    message = str(refused.value)
    assert "\n" not in message and message.endswith("(NEWSLETTER_ENV is production)")
    assert "default key" in message and "not https and on localhost" in message
    assert "placeholder" in message
    assert DEV_SECRET_KEY not in message
    with pytest.raises(ProductionError, match="holds no key"):
        check_settings(env="development", **{**ok, "secret_key": ","})


# --- issues check: the gate's problems are errors in production, warnings elsewhere ----------


def _message(html: str, text: str, unsubscribe: str = "https://news.example.org/u/t") -> bytes:
    return (
        "From: Desk <desk@example.org>\r\nTo: a@example.org\r\nSubject: s\r\n"
        "Date: Sat, 28 Nov 2026 18:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
        "MIME-Version: 1.0\r\nList-Id: <w.example.org>\r\n"
        f"List-Unsubscribe: <{unsubscribe}>, <mailto:desk@example.org>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nPrecedence: bulk\r\n"
        'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{text}\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b--\r\n"
    ).encode()


@pytest.mark.parametrize("in_production", [False, True])
def test_check_message_applies_the_gate(in_production: bool) -> None:
    html = (
        '<p><a href="http://news.example.org/a">a</a> <a href="https://localhost/b">b</a>'
        f' <a href="{"https://news.example.org/u/t"}">unsubscribe</a></p>'
        f"<p>{PLACEHOLDER_POSTAL_ADDRESS}</p>"
    )
    problems = checks.check_message(
        _message(html, "Read https://news.example.org/x"), in_production=in_production
    )
    severity = {p.code: p.severity for p in problems}
    want = "error" if in_production else "warning"
    assert severity["dkim"] == want
    assert severity["insecure-link"] == want
    assert severity["local-link"] == want
    assert severity["postal-address"] == want


def test_check_message_finds_bad_links_in_the_text_part_and_list_unsubscribe() -> None:
    html = '<p><a href="http://localhost:8000/u/t">unsubscribe</a></p>'
    problems = checks.check_message(
        _message(html, "https://news.example.org/x", "http://localhost:8000/u/t"),
        in_production=True,
    )
    local = next(p for p in problems if p.code == "local-link")
    assert local.message.startswith("1 link(s) on localhost")  # the same URL counts once
    text_only = checks.check_message(
        _message("<p>x</p>", "see http://news.example.org/x"), in_production=True
    )
    assert "insecure-link" in {p.code for p in text_only if p.severity == "error"}


def test_a_clean_message_has_no_gate_problem_in_production() -> None:
    html = '<p><a href="https://news.example.org/u/t">unsubscribe</a> World Desk, 1 Real Rd</p>'
    problems = checks.check_message(
        _message(html, "https://news.example.org/x"), in_production=True
    )
    assert {p.code for p in problems} == {"dkim"}
