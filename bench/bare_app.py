"""Baseline for bench_server.py: a bare FastAPI endpoint answering the check-in and telemetry
paths with a fixed body of the size the real server returns (``BARE_BODY_BYTES``).

``BARE_MODE=async`` (default) declares the routes ``async def``, like the server's check-in and
telemetry routes; ``BARE_MODE=sync`` declares them ``def``, which FastAPI runs in its threadpool
(the usual way FastAPI endpoints are written, and slower: a thread hop per request). The bench
reports the server against both.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response

app = FastAPI()
BODY = b'{"pad":"' + b"x" * max(0, int(os.environ.get("BARE_BODY_BYTES", "1000")) - 10) + b'"}'

if os.environ.get("BARE_MODE", "async") == "sync":

    @app.post("/v1/devices/{device_id}/check-in")
    def check_in(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

    @app.post("/v1/devices/{device_id}/telemetry")
    def telemetry(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

else:

    @app.post("/v1/devices/{device_id}/check-in")
    async def check_in_async(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")

    @app.post("/v1/devices/{device_id}/telemetry")
    async def telemetry_async(device_id: str) -> Response:
        return Response(BODY, media_type="application/json")
