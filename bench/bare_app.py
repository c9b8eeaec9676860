"""Baseline for bench_server.py: a bare FastAPI endpoint answering the check-in and telemetry
paths with a fixed body of the size the real server returns (``BARE_BODY_BYTES``).

The routes are ``async def``, like the server's check-in and telemetry routes: a plain ``def``
route pays for a threadpool hop, which would make the baseline slower and the ratio kinder.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response

app = FastAPI()
BODY = b'{"pad":"' + b"x" * max(0, int(os.environ.get("BARE_BODY_BYTES", "1000")) - 10) + b'"}'


@app.post("/v1/devices/{device_id}/check-in")
async def check_in(device_id: str) -> Response:
    return Response(BODY, media_type="application/json")


@app.post("/v1/devices/{device_id}/telemetry")
async def telemetry(device_id: str) -> Response:
    return Response(BODY, media_type="application/json")
