"""Receive a request body into a temporary file, a chunk at a time, up to a size limit.

An upload never sits in memory whole: a 150 MB CSV costs the few chunks in flight. A body
over the limit is refused with 413 as soon as its Content-Length says so, or as soon as the
bytes counted pass it (a chunked upload has no Content-Length), and its file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import HTTPException, Request

PREFIX = "newsletter-import-"


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"the upload is larger than {limit} bytes (NEWSLETTER_IMPORT_MAX_BYTES); "
        "split the file or raise the limit",
    )


async def receive_to_file(request: Request, limit: int, suffix: str = ".csv") -> Path:
    """The request body in a new temporary file (the caller removes it), or 413."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=suffix)
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
