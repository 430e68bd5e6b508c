"""User-facing errors. Each carries a one-line message; the CLI prints it without a traceback
and the web API maps the class to a status code. They also inherit the matching builtin."""


class NewsletterError(Exception):
    """Base of every error a user can cause and fix."""


class InvalidInput(NewsletterError, ValueError):
    """Malformed input (400/422)."""


class NotFound(NewsletterError, LookupError):
    """An unknown list, subscriber, issue or token (404)."""


class Conflict(NewsletterError):
    """The request contradicts the current state, e.g. sending an issue twice (409)."""
