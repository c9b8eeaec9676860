"""Baselines for bench_server.py: bare FastAPI endpoints answering the check-in and telemetry
paths with a fixed body of the size the real server returns (``BARE_BODY_BYTES``).

``BARE_MODE`` picks the baseline:

- ``async`` (default): the routes are ``async def``, like the server's check-in and telemetry
  routes, and do nothing but answer.
- ``sync``: the routes are ``def``, which FastAPI runs in its threadpool (the usual way FastAPI
  endpoints are written, and slower: a thread hop per request).
- ``floor``: ``async def`` routes that do only what no implementation of the two routes can
  skip: check-in reads its body and signs its answer with Ed25519 (the director's signature a
  device checks, docs/check-in.md); telemetry reads its body and validates it as a
  :class:`~firmware_bundles.messages.TelemetryBatch` (the wire format's own checks, before any
  of the server's). Its ratio to ``async`` is the highest ratio the server could reach with
  nothing else to do: no database, no lookups, no rollout logic.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import FastAPI, Request, Response

app = FastAPI()
BODY = b'{"pad":"' + b"x" * max(0, int(os.environ.get("BARE_BODY_BYTES", "1000")) - 10) + b'"}'
MODE = os.environ.get("BARE_MODE", "async")

if MODE == "sync":

    @app.post("/v1/devices/{device_id}/check-in")
    def check_in(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

    @app.post("/v1/devices/{device_id}/telemetry")
    def telemetry(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

elif MODE == "floor":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from firmware_bundles import SigningKey
    from firmware_bundles.messages import TelemetryBatch

    KEY = SigningKey.generate()

    @app.post("/v1/devices/{device_id}/check-in")
    async def check_in_floor(device_id: str, request: Request) -> Response:
        await request.body()
        KEY.sign(BODY)
        return Response(BODY, media_type="application/json")

    @app.post("/v1/devices/{device_id}/telemetry")
    async def telemetry_floor(device_id: str, request: Request) -> Response:
        TelemetryBatch.from_bytes(await request.body())
        return Response(BODY, media_type="application/json")

else:

    @app.post("/v1/devices/{device_id}/check-in")
    async def check_in_async(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

    @app.post("/v1/devices/{device_id}/telemetry")
    async def telemetry_async(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")
