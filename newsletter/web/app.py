"""Build the web app from a Runtime: `newsletter serve` runs `create_app(runtime)` under
uvicorn. Public pages answer HTML, the operator API under /api answers JSON, and both
turn the package's errors into the right status code."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from newsletter.articles import ArticleParseError
from newsletter.dispatch import Dispatcher
from newsletter.errors import Conflict, InvalidInput, NewsletterError, NotFound
from newsletter.message import HeaderValueError
from newsletter.runtime import Runtime
from newsletter.tokens import TokenError
from newsletter.web import api, ids, pages
from newsletter.web.api import UpstreamError
from newsletter.web.context import SampleLinkOpened, WebContext, page_environment, sentence
from newsletter.web.limits import Limiter, SubscribeLimits, make_limiter
from newsletter.web.redact import RedactLinkTokens, redact_tokens

log = logging.getLogger(__name__)

DESCRIPTION = """\
Public pages (HTML): subscribe with double opt-in, confirm, unsubscribe (also RFC 8058
one-click), preferences, the archive and its Atom feed.

Operator API (JSON) under `/api`, with `Authorization: Bearer <NEWSLETTER_ADMIN_TOKEN>`.
Errors are `{"error": "..."}` with status 400, 401, 403, 404, 409 or 422.
"""


def create_app(
    runtime: Runtime,
    *,
    limits: SubscribeLimits | None = None,
    limiter: Limiter | None = None,
) -> FastAPI:
    app = FastAPI(
        title="newsletter",
        description=DESCRIPTION,
        version="0.1.0",
        docs_url="/docs",
        redoc_url=None,
        # Starlette's own slash redirect builds an absolute URL from the Host header (a
        # spoofed Host would send readers elsewhere); ours is relative (see _slash_redirect).
        redirect_slashes=False,
    )
    app.state.web = WebContext(
        runtime=runtime,
        pages=page_environment(runtime.settings.templates_dir / "web"),
        limiter=limiter or make_limiter(runtime.settings.broker_url),
        limits=limits or SubscribeLimits(),
        dispatcher=Dispatcher(runtime),
    )
    app.include_router(pages.router)
    app.include_router(api.router)
    _install_error_handlers(app)
    _redact_access_log()
    return app


def _redact_access_log() -> None:
    # uvicorn configures its loggers after the app is built and keeps existing filters.
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactLinkTokens) for f in logger.filters):
            logger.addFilter(RedactLinkTokens())


def _is_api(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def _status_of(exc: Exception) -> int:
    if isinstance(exc, TokenError):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, UpstreamError):
        return 502
    if isinstance(exc, InvalidInput | HeaderValueError | ArticleParseError):
        return 422
    return 400


_PAGE_TITLES = {
    400: "This link does not work",
    404: "Not found",
    405: "Not allowed",
    409: "That cannot be done now",
    422: "Please check what you entered",
    429: "Too many requests",
    500: "Something went wrong",
}


def _error(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    if _is_api(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    ctx: WebContext = request.app.state.web
    title = _PAGE_TITLES.get(status, "Something went wrong")
    hint = None
    if status == 400:
        hint = (
            "Copy the whole link from the email into your browser's address bar. "
            "Nothing was changed."
        )
    return ctx.error_page(status, title, sentence(message), hint)


def _slash_redirect(request: Request) -> Response | None:
    """`/subscribe/world/` -> `/subscribe/world`: a relative Location (never built from the
    Host header), only to a route that exists, and never to `//host` (another site)."""
    path = request.url.path
    if request.method not in ("GET", "HEAD") or len(path) < 2 or not path.endswith("/"):
        return None
    target = path.rstrip("/")
    if not target.startswith("/") or target.startswith(("//", "/\\")):
        return None
    scope = {"type": "http", "path": target, "root_path": "", "method": request.method}
    if not any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
        return None
    query = request.url.query
    location = quote(target) + (f"?{query}" if query else "")
    return RedirectResponse(location, status_code=308)


def _install_error_handlers(app: FastAPI) -> None:
    async def newsletter_error(request: Request, exc: Exception) -> Response:
        status = _status_of(exc)
        if not _is_api(request) and status == 422:
            status = 400
        details = getattr(exc, "details", None)  # e.g. the problems of a refused send
        if _is_api(request) and isinstance(details, dict):
            return JSONResponse({"error": str(exc), **details}, status_code=status)
        return _error(request, status, str(exc))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        for error in errors:  # an id in the path that cannot exist names nothing: 404
            if error.get("type") == ids.ERROR_TYPE and tuple(error.get("loc", ()))[:1] == ("path",):
                thing = error.get("ctx", {}).get("thing", "item")
                return _error(request, 404, f"unknown {thing} {ids.shown(error.get('input'))}")
        if first.get("type") == "json_invalid":
            return _error(request, 400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request"))
        return _error(
            request, 422 if _is_api(request) else 400, f"{where}: {message}" if where else message
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and (redirect := _slash_redirect(request)) is not None:
            return redirect
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = "there is no page at this address"
        elif exc.status_code == 405 and message == "Method Not Allowed":
            message = "this address does not accept that method"
        return _error(request, exc.status_code, message, getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        path = redact_tokens(request.url.path)
        log.error("unhandled error on %s %s", request.method, path, exc_info=exc)
        return _error(request, 500, "an internal error occurred; it has been logged")

    async def sample_link(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SampleLinkOpened)
        ctx: WebContext = request.app.state.web
        what = {"unsubscribe": "unsubscribe", "preferences": "manage their preferences"}
        return ctx.render(
            "sample.html",
            title="This was a test copy",
            action=what.get(exc.purpose.value, "use this link"),
        )

    app.add_exception_handler(SampleLinkOpened, sample_link)
    app.add_exception_handler(NewsletterError, newsletter_error)
    app.add_exception_handler(ArticleParseError, newsletter_error)
    app.add_exception_handler(HeaderValueError, newsletter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
