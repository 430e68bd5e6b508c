"""The production gate (pure): the rules that ENV=production enforces, in one place.

Settings use them at start (a dev, known-default, empty or short key, a BASE_URL that is not
https or points at this machine, the placeholder postal address: refused), `issues check` uses
them on a built message (missing DKIM, http or localhost links, the placeholder postal address:
errors in production, warnings elsewhere), and a send in production refuses to start while
`issues check` reports an error. Nothing here reads the environment or touches a file.
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

DEV_SECRET_KEY: Final = "dev-insecure-secret-key-change-me"  # noqa: S105 - the documented dev default
PLACEHOLDER_POSTAL_ADDRESS: Final = "Newsletter Desk, 1 Example Street, Example City"
MIN_KEY_BYTES: Final = 32

# Keys that are public (our default, the ones our docs and tests use, the usual "change me"
# values): whoever knows them can sign any link, so production refuses them at any length.
KNOWN_KEYS: Final = frozenset(
    {
        DEV_SECRET_KEY,
        "test-secret-key",
        "bench-import-secret",
        "change-me",
        "changeme",
        "change-this",
        "secret",
        "secret-key",
        "secretkey",
        "your-secret-key",
        "please-change-me",
    }
)


class ProductionError(ValueError):
    """A setting that production refuses (one line, never the secret itself)."""


def is_production(env: str) -> bool:
    """ENV means production when it starts with "prod" in any case: production, Prod,
    PRODUCTION-eu."""
    return env.strip().lower().startswith("prod")


def split_keys(raw: str) -> list[str]:
    """SECRET_KEY's comma-separated keys, stripped, in order (empty items kept as "")."""
    return [part.strip() for part in raw.split(",")]


def key_problems(raw: str, *, production: bool) -> list[str]:
    """What is wrong with SECRET_KEY. Everywhere: no key at all (empty, "," or ", ,").
    In production also: any empty item, any known or development key, any key under
    MIN_KEY_BYTES bytes, wherever it stands in the list."""
    keys = split_keys(raw)
    if not any(keys):
        return ["NEWSLETTER_SECRET_KEY holds no key (it is empty or only commas and spaces)"]
    if not production:
        return []
    many = len(keys) > 1
    problems = []
    for n, key in enumerate(keys, 1):
        which = (
            f"key {n} of {len(keys)} in NEWSLETTER_SECRET_KEY"
            if many
            else ("NEWSLETTER_SECRET_KEY")
        )
        if not key:
            problems.append(f"{which} is empty")
        elif key in KNOWN_KEYS or key.lower() in KNOWN_KEYS:
            problems.append(f"{which} is a development or published default key")
        elif len(key.encode("utf-8")) < MIN_KEY_BYTES:
            problems.append(
                f"{which} is shorter than {MIN_KEY_BYTES} bytes (make one with: python -c "
                "'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return problems


def is_local_host(host: str) -> bool:
    """localhost, *.localhost, and loopback or unspecified addresses (127.0.0.1, ::1, 0.0.0.0):
    a link there leads every reader to their own machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def url_problems(url: str) -> list[str]:
    """Why a link in mail we send, or BASE_URL, is not fit for production: "not https"
    and/or "on localhost" (none when it is fine, or when it is not a web link at all)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        return []  # a malformed URL is the link checker's business
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return []
    reasons = []
    if scheme != "https":
        reasons.append("not https")
    if is_local_host(host):
        reasons.append("on localhost")
    return reasons


def base_url_problems(base_url: str) -> list[str]:
    reasons = url_problems(base_url)
    if not reasons:
        return []
    why = " and ".join(reasons)
    return [f"NEWSLETTER_BASE_URL {base_url!r} is {why}: readers' links would not work safely"]


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def is_placeholder_postal_address(postal_address: str) -> bool:
    return _flat(postal_address) == _flat(PLACEHOLDER_POSTAL_ADDRESS)


def carries_placeholder_postal_address(text: str) -> bool:
    """Whether a message part shows the placeholder address (composed before it was set)."""
    return _flat(PLACEHOLDER_POSTAL_ADDRESS) in _flat(text)


def postal_address_problems(postal_address: str) -> list[str]:
    if not postal_address.strip():
        return ["NEWSLETTER_POSTAL_ADDRESS is empty: bulk mail must carry the sender's address"]
    if is_placeholder_postal_address(postal_address):
        return [
            "NEWSLETTER_POSTAL_ADDRESS is the placeholder: set the sender's real postal address"
        ]
    return []


def settings_problems(
    *, env: str, secret_key: str, base_url: str, postal_address: str
) -> list[str]:
    """Every reason these settings may not start: key problems everywhere, and in
    production the rest of the gate. Empty when they may."""
    production = is_production(env)
    problems = key_problems(secret_key, production=production)
    if production:
        problems += base_url_problems(base_url)
        problems += postal_address_problems(postal_address)
    return problems


def check_settings(*, env: str, secret_key: str, base_url: str, postal_address: str) -> None:
    """Raise ProductionError naming every problem, on one line."""
    problems = settings_problems(
        env=env, secret_key=secret_key, base_url=base_url, postal_address=postal_address
    )
    if problems:
        where = " (NEWSLETTER_ENV is production)" if is_production(env) else ""
        raise ProductionError("; ".join(problems) + where)
