"""Self-hosted newsletter delivery: subscription store, digest composer, Celery delivery."""

__version__ = "0.1.0"
