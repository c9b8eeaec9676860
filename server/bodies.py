"""Upload bodies read against their cap: refused on ``Content-Length`` before a byte is read, and
a streamed (chunked) body refused as soon as it passes the cap, so memory is bounded by the cap
whatever the client claims or sends."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

from fastapi import Request

from server.errors import ApiError


async def body_pieces(
    request: Request, max_bytes: int, what: str, piece_bytes: int = 1 << 20
) -> AsyncIterator[bytes]:
    """The request's body in pieces of about ``piece_bytes``, at most ``max_bytes`` in all.

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
    received = 0
    piece = io.BytesIO()
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise ApiError(413, f"{what} over {max_bytes} bytes")
        piece.write(chunk)
        if piece.tell() >= piece_bytes:
            yield piece.getvalue()
            piece = io.BytesIO()
    if piece.tell():
        yield piece.getvalue()


async def read_body(request: Request, max_bytes: int, what: str) -> bytes:
    """The request's body, at most ``max_bytes`` of it (see :func:`body_pieces`).

    Raises:
        ApiError: As :func:`body_pieces`.
    """
    body = io.BytesIO()
    async for piece in body_pieces(request, max_bytes, what):
        body.write(piece)
    return body.getvalue()
