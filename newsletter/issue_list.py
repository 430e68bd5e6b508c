"""The issue list: every issue (or one list's), newest first, as the CLI and the API show it.

Kept apart from issues.py so that listing issues does not load the composer (Jinja2,
premailer) into a command that only reads rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.models import Issue, MailingList
from newsletter.subscriptions import get_list


def list_issues(session: Session, list_slug: str | None = None) -> list[dict[str, Any]]:
    """Issues newest first, of one list if `list_slug` is given (unknown: NotFound), each as
    {"id", "list" (its slug), "subject", "status", "created_at" (a datetime or None)}."""
    query = (
        select(Issue, MailingList.slug)
        .join(MailingList, MailingList.id == Issue.list_id)
        .order_by(Issue.id.desc())
    )
    if list_slug:
        query = query.where(Issue.list_id == get_list(session, list_slug).id)
    return [
        {
            "id": issue.id,
            "list": slug,
            "subject": issue.subject,
            "status": issue.status.value,
            "created_at": issue.created_at,
        }
        for issue, slug in session.execute(query).all()
    ]
