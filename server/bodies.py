"""Upload bodies read against their cap: refused on ``Content-Length`` before a byte is read, and
a streamed (chunked) body refused as soon as it passes the cap, so memory is bounded by the cap
whatever the client claims or sends."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.errors import ApiError
from server.schemas import inline_refs

M = TypeVar("M", bound=BaseModel)


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


async def json_body(request: Request, model: type[M], max_bytes: int, what: str) -> M:
    """The request's JSON body as ``model``, at most ``max_bytes`` of it (see
    :func:`body_pieces`), parsed and validated in one pass (pydantic's JSON parser), for a hot
    route that declares its body with :func:`json_body_openapi` rather than as a parameter
    (FastAPI's way decodes with :mod:`json`, then validates the Python objects).

    Raises:
        ApiError: As :func:`body_pieces`, for a body over the cap.
        RequestValidationError: As FastAPI raises for a body parameter (a 422 whose ``detail``
            lists each error, its ``loc`` starting with ``"body"``).
    """
    body = await read_body(request, max_bytes, what)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {**error, "loc": ("body", *error["loc"]), "input": _shown(error["input"])}
            for error in exc.errors(include_url=False)
        ]
        raise RequestValidationError(errors, body=body) from None


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose body :func:`json_body` reads."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_refs(model.model_json_schema())}},
        }
    }


def _shown(value: Any) -> Any:
    # A body that is not JSON is its own error's input: shown as text, whatever its bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
