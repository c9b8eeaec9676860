"""Upload bodies read against their cap: refused on ``Content-Length`` before a byte is read, and
a streamed (chunked) body refused as soon as it passes the cap, so memory is bounded by the cap
whatever the client claims or sends."""

from __future__ import annotations

import io

from fastapi import Request

from server.errors import ApiError


async def read_body(request: Request, max_bytes: int, what: str) -> bytes:
    """The request's body, at most ``max_bytes`` of it.

    Raises:
        ApiError: 413 naming ``what`` and the cap when the declared or received length is over
            it; 400 for a ``Content-Length`` that is not a length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a length in bytes")
        if int(declared) > max_bytes:
            raise ApiError(413, f"{what} over {max_bytes} bytes (Content-Length {declared})")
    body = io.BytesIO()
    async for chunk in request.stream():
        if body.tell() + len(chunk) > max_bytes:
            raise ApiError(413, f"{what} over {max_bytes} bytes")
        body.write(chunk)
    return body.getvalue()
