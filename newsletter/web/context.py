"""What every request handler needs, built once per app from the Runtime."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from newsletter.addresses import address_key
from newsletter.dispatch import Dispatcher
from newsletter.runtime import Runtime
from newsletter.samples import is_sample_token
from newsletter.tokens import Purpose
from newsletter.web.limits import Limiter, SubscribeLimits

# Every public page: no scripts at all, nothing from elsewhere, no Referer carrying a link
# token to the sites an issue links to, never framed, never cached (pages show personal
# state behind a token).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def page_environment(templates_dir: Any) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@dataclass
class WebContext:
    runtime: Runtime
    pages: jinja2.Environment
    limiter: Limiter
    limits: SubscribeLimits
    dispatcher: Dispatcher

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.runtime.sessions() as session, session.begin():
            yield session

    def render(self, template: str, *, status: int = 200, **values: Any) -> HTMLResponse:
        body = self.pages.get_template(template).render(values)
        return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)

    def error_page(
        self, status: int, title: str, message: str, hint: str | None = None
    ) -> HTMLResponse:
        return self.render("error.html", status=status, title=title, message=message, hint=hint)

    def verify(self, purpose: Purpose, signed: str) -> str:
        """The subscription token inside a link, or TokenError (a 400 page), or
        SampleLinkOpened for a link of a preview or test copy (the test-copy page)."""
        token = self.runtime.links.signer.unsign(purpose, signed)
        if is_sample_token(token):
            raise SampleLinkOpened(purpose)
        return token

    def path(self, purpose: Purpose, token: str) -> str:
        """A link to one of our own pages, relative so that it works on any host name."""
        return f"/{purpose.value}/{self.runtime.links.signer.sign(purpose, token)}"

    def address_key(self, address: str) -> str:
        """A keyed hash of an address's identity (addresses.address_key: every capitalisation
        is one reader), for rate-limit keys (no address leaves the database)."""
        key = self.runtime.rate_limit_key.encode()
        return hmac.new(key, address_key(address).encode(), hashlib.sha256).hexdigest()[:32]


class SampleLinkOpened(Exception):
    """A validly signed link of a preview or test copy: it belongs to nobody, so the app
    answers with the test-copy page (200) and changes nothing."""

    def __init__(self, purpose: Purpose) -> None:
        super().__init__(f"a {purpose.value} link of a test copy")
        self.purpose = purpose


def web_context(request: Request) -> WebContext:
    context: WebContext = request.app.state.web
    return context


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def sentence(message: str) -> str:
    """An error message as a sentence for a page: capital first, full stop last."""
    message = message.strip()
    return message[:1].upper() + message[1:] + ("" if message.endswith((".", "!", "?")) else ".")
