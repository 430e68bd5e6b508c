"""The Celery side: the app (built from settings) and thin tasks that call the package."""
