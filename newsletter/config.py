"""Typed settings, read once from the environment (prefix NEWSLETTER_) and passed down.

Only the wiring modules (CLI, web app, worker app) call :func:`get_settings`; everything
below them receives the values it needs through its constructor or arguments.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from newsletter import production as gate
from newsletter.production import DEV_SECRET_KEY, PLACEHOLDER_POSTAL_ADDRESS

log = logging.getLogger(__name__)

__all__ = ["DEV_SECRET_KEY", "ConfigError", "Settings", "SmtpConfig", "get_settings"]
REPO_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
VISIBILITY_MARGIN = 60  # seconds between the longest hold of a batch and the visibility timeout


class ConfigError(ValueError):
    """A setting that cannot work; raised at start, before anything is sent."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEWSLETTER_", extra="ignore")

    env: str = "development"
    database_url: str = "sqlite:///newsletter.db"
    broker_url: str = ""
    smtp_url: SecretStr = SecretStr("")
    outbox_dir: Path = Path("outbox")
    base_url: str = "http://localhost:8000"
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    admin_token: SecretStr = SecretStr("")
    batch_size: int = Field(default=500, ge=1, le=100_000)
    # The largest CSV the import endpoint accepts (streamed to a temporary file); beyond: 413.
    import_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    rate_limit: float = Field(default=0, ge=0)
    # Per destination domain, on top of RATE_LIMIT: "gmail.com=50,yahoo.com=20" (messages per
    # second across all workers; a domain's subdomains share its budget).
    domain_rate_limits: str = ""
    dkim_domain: str = ""
    dkim_selector: str = ""
    dkim_key_file: str = ""
    # VERP: the envelope sender of each delivery is bounces+ID-MAC@BOUNCE_DOMAIN, so a bounce
    # names its delivery even when the report itself is mangled. Empty: the From address.
    bounce_domain: str = ""
    soft_bounce_limit: int = Field(default=5, ge=1)
    complaint_pause_rate: float = Field(default=0.003, ge=0, le=1)
    complaint_pause_min: int = Field(default=1, ge=1)
    postal_address: str = PLACEHOLDER_POSTAL_ADDRESS
    templates_dir: Path = REPO_TEMPLATES

    # Delivery timing. A claimed batch holds its rows for lease_seconds; a temporary SMTP
    # failure is retried with backoff until retry_deadline_hours after the send started.
    # Both stay below the broker's visibility timeout so that Redis never redelivers a task
    # whose rows are still legitimately held (see docs/architecture.md).
    lease_seconds: int = Field(default=600, ge=10)
    retry_base_seconds: float = Field(default=60, gt=0)
    retry_max_seconds: float = Field(default=1800, gt=0)
    retry_deadline_hours: float = Field(default=24, gt=0)
    visibility_timeout: int = Field(default=7200, ge=60)
    smtp_timeout: float = Field(default=30, gt=0)
    max_consecutive_failures: int = Field(default=50, ge=1)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("BASE_URL must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("domain_rate_limits")
    @classmethod
    def _check_domain_limits(cls, value: str) -> str:
        parse_domain_limits(value)  # raises with the offending item
        return value

    @field_validator("dkim_domain", "bounce_domain")
    @classmethod
    def _idna_domain(cls, value: str) -> str:
        """Lower-cased A-labels (IDNA), as DKIM d= and the envelope need them."""
        if not value.strip():
            return ""
        from newsletter.dkim import check_domain

        return check_domain(value, "domain")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        # The production gate (newsletter/production.py): no key at all is refused in every
        # environment; in production also dev, known, empty or short keys, a BASE_URL that is
        # not https or on localhost, and the placeholder postal address.
        gate.check_settings(
            env=self.env,
            secret_key=self.secret_key.get_secret_value(),
            base_url=self.base_url,
            postal_address=self.postal_address,
        )
        if self.retry_base_seconds > self.retry_max_seconds:
            raise ValueError(
                f"NEWSLETTER_RETRY_BASE_SECONDS ({self.retry_base_seconds:g}s) must not exceed "
                f"NEWSLETTER_RETRY_MAX_SECONDS ({self.retry_max_seconds:g}s)"
            )
        # A batch task waits in a worker (unacknowledged) for at most the longest retry delay
        # or one lease before it runs again; Redis hands an unacknowledged task to another
        # worker after the visibility timeout. Keep a margin for a busy worker's pool.
        longest_hold = max(self.lease_seconds, self.retry_max_seconds) + VISIBILITY_MARGIN
        if self.broker_url and longest_hold > self.visibility_timeout:
            raise ValueError(
                f"NEWSLETTER_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed the "
                "lease and the longest retry delay by at least "
                f"{VISIBILITY_MARGIN}s (so at least {longest_hold:g}s), or Redis would hand "
                "a held batch to a second worker"
            )
        return self

    @property
    def domain_limits(self) -> dict[str, float]:
        return parse_domain_limits(self.domain_rate_limits)

    @property
    def secret_keys(self) -> list[str]:
        """SECRET_KEY may hold several comma-separated keys: the first signs, all verify."""
        return [k.strip() for k in self.secret_key.get_secret_value().split(",") if k.strip()]

    @property
    def using_dev_secret(self) -> bool:
        """Whether any key of SECRET_KEY is the development default (it verifies links)."""
        return DEV_SECRET_KEY in self.secret_keys

    @property
    def production(self) -> bool:
        """ENV starts with "prod" in any case: the production gate applies."""
        return gate.is_production(self.env)

    def smtp(self) -> SmtpConfig | None:
        raw = self.smtp_url.get_secret_value()
        return SmtpConfig.parse(raw, timeout=self.smtp_timeout) if raw else None


def parse_domain_limits(text: str) -> dict[str, float]:
    """Parse DOMAIN_RATE_LIMITS: "gmail.com=50,yahoo.com=20" -> {"gmail.com": 50.0, ...}."""
    limits: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        domain, sep, rate = item.partition("=")
        domain = domain.strip().lower().rstrip(".")
        try:
            value = float(rate) if sep else 0.0
        except ValueError:
            value = 0.0
        if not domain or "@" in domain or " " in domain or not 0 < value < math.inf:
            raise ValueError(
                f"NEWSLETTER_DOMAIN_RATE_LIMITS: {item!r} is not DOMAIN=MESSAGES_PER_SECOND "
                "(e.g. gmail.com=50,yahoo.com=20)"
            )
        limits[domain] = value
    return limits


class SmtpConfig:
    """Parsed NEWSLETTER_SMTP_URL: smtp://user:pass@host:587?starttls=1 or smtps://host:465."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: bool,
        starttls: bool,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.starttls = starttls
        self.username = username
        self.password = password
        self.timeout = timeout

    def __repr__(self) -> str:  # never print the password
        return f"SmtpConfig({self.host}:{self.port}, ssl={self.ssl}, starttls={self.starttls})"

    @classmethod
    def parse(cls, url: str, *, timeout: float = 30) -> SmtpConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ConfigError("NEWSLETTER_SMTP_URL must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ConfigError("NEWSLETTER_SMTP_URL has no host")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        ssl = parts.scheme == "smtps"
        starttls = query.get("starttls", "0").lower() in ("1", "true", "yes")
        port = parts.port or (465 if ssl else 25)
        return cls(
            parts.hostname,
            port,
            ssl=ssl,
            starttls=starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=float(query.get("timeout", timeout)),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(_first_error(exc)) from None
    if settings.using_dev_secret:
        log.warning("NEWSLETTER_SECRET_KEY is the development default; set it before going live")
    return settings


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"invalid setting {where.upper()}: {msg}" if where else f"invalid settings: {msg}"
    return str(exc)
