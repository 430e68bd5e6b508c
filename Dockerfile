# The newsletter application image: web app, Celery worker, beat and `newsletter init`
# all run from it (see docker-compose.yml). Build: docker build -t newsletter .
FROM python:3.11-slim

# The package is installed non-editable into site-packages, so the Jinja2 templates
# (which live beside the package in the repo, not inside it) are read from /app.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NEWSLETTER_TEMPLATES_DIR=/app/templates

# An unprivileged user owns nothing but the working directory (sqlite file, outbox,
# celerybeat-schedule when those defaults are used); the code itself stays root-owned.
RUN groupadd --system --gid 10001 newsletter \
    && useradd --system --uid 10001 --gid newsletter --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin newsletter

WORKDIR /app

# README.m[d] is optional: a wildcard that matches nothing is allowed as long as another
# source (pyproject.toml) matches.
COPY pyproject.toml README.m[d] ./
COPY newsletter/ ./newsletter/
COPY worker/ ./worker/
COPY templates/ ./templates/

RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && chown newsletter:newsletter /app

USER newsletter:newsletter

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["newsletter", "serve", "--host", "0.0.0.0", "--port", "8000"]
