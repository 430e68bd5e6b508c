"""The web app: public pages (subscribe, confirm, unsubscribe, preferences, archive) and the
operator API under /api. Build it with :func:`newsletter.web.app.create_app`.

This package's __init__ imports nothing: importing one of its modules loads FastAPI only
where that module needs it.
"""
