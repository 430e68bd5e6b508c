"""The web app: public pages (subscribe, confirm, unsubscribe, preferences, archive) and the
operator API under /api. Build it with :func:`newsletter.web.app.create_app`.

This package's __init__ imports nothing, so that a worker can use the pure helpers
(:mod:`newsletter.web.optin`) without loading FastAPI.
"""
