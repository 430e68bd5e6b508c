"""The per-process cache of prepared issues: each issue and variant is compiled once per
worker process and reused by every batch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from newsletter.errors import NotFound
from newsletter.models import Issue, IssueVariant, MailingList

if TYPE_CHECKING:
    from newsletter.bounces import Verp
    from newsletter.dkim import DkimSigner
from newsletter.outgoing import PreparedIssue, prepare_issue


class IssueCache:
    """Per-process cache of prepared issues and variants: each is compiled once per worker
    process and reused by every batch."""

    def __init__(
        self, size: int = 32, *, dkim: DkimSigner | None = None, verp: Verp | None = None
    ) -> None:
        self.size = size
        self.dkim = dkim
        self.verp = verp
        self._items: dict[tuple[int, int | None], PreparedIssue] = {}
        self._lock = threading.Lock()  # a threads-pool worker sends several batches at once

    def get(self, session: Session, issue_id: int, variant_id: int | None = None) -> PreparedIssue:
        prepared = self._items.get((issue_id, variant_id))
        if prepared is None:
            issue = session.get(Issue, issue_id)
            if issue is None:
                raise NotFound(f"unknown issue {issue_id}")
            mlist = session.get(MailingList, issue.list_id)
            assert mlist is not None
            variant = session.get(IssueVariant, variant_id) if variant_id is not None else None
            prepared = prepare_issue(issue, mlist, variant=variant, dkim=self.dkim, verp=self.verp)
            with self._lock:
                if len(self._items) >= self.size:
                    self._items.pop(next(iter(self._items)))
                self._items[(issue_id, variant_id)] = prepared
        return prepared
