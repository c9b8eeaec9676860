"""The FastAPI application: state at start-up, error mapping, health, metrics, root chain, logs."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy import text
from sqlmodel import Session, select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from server import ingest_store, invalidation
from server.auth import hash_token, new_token
from server.checkin_store import make_store
from server.config import Settings
from server.db import check_schema, make_engine
from server.errors import ApiError
from server.hot_routes import HotRoutes
from server.jobs import Jobs, jobs_for
from server.models import ApiToken
from server.routes import admin, devices, registry, rollouts, telemetry, webhooks
from server.routes import metrics as metrics_routes
from server.schemas import Health, NotReady, Problem, Ready, RootEnvelope
from server.state import BlobStore, ServerState, load_catalogue, load_trust
from server.ui.routes import install as install_dashboard
from server.ui.routes import router as ui_router

log = logging.getLogger("edgefleet.server")


def build_state(settings: Settings) -> ServerState:
    """Open the database (refusing a schema that is behind) and load trust material.

    Raises:
        ConfigError: If anything needed to serve is missing or wrong.
    """
    engine = make_engine(settings.resolved_database_url())
    check_schema(engine)
    trusted, chain, director = load_trust(settings)
    return ServerState(
        settings=settings,
        engine=engine,
        trusted=trusted,
        root_chain=chain,
        director_key=director,
        catalogue=load_catalogue(settings),
        blobs=BlobStore(settings.blob_dir),
        check_in_store=make_store(engine),
        ingest_store=ingest_store.make_store(engine),
    )


def ensure_admin_token(state: ServerState) -> str | None:
    """On first start (no API token yet), create an admin token and return it, once."""
    with Session(state.engine) as session:
        if session.exec(select(ApiToken.id)).first() is not None:
            return None
        token = new_token("api")
        session.add(
            ApiToken(
                name="admin",
                role="admin",
                token_hash=hash_token(token),
                created_at=datetime.now(UTC),
            )
        )
        session.commit()
        return token


#: How long after start a server process freezes what it holds (see :func:`create_app`).
SETTLE_S = 15.0


def create_app(state: ServerState, *, freeze_when_settled: bool = False) -> FastAPI:
    """The application for ``state``.

    ``freeze_when_settled``: for the process that serves it (``edgefleet serve`` and each
    worker), which freezes what start-up allocated before uvicorn starts; :data:`SETTLE_S`
    seconds after start it freezes again what the first seconds added (the jobs' first runs,
    connection pools, validators and statements built on first use), so the collector's full
    collections under load scan only what requests leave behind. Unfrozen, that was 60-105 ms
    pauses every second or two at a sync wave's crest (docs/scaling.md, "Load").
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        jobs = Jobs(jobs_for(state), state.engine)
        jobs.start()
        # Other server processes' changes to what is offered (PostgreSQL; None on SQLite).
        listener = invalidation.listen(state.engine, state.offers.invalidate)
        settle = asyncio.create_task(_freeze_after(SETTLE_S)) if freeze_when_settled else None
        yield
        if settle is not None:
            settle.cancel()
        if listener is not None:
            listener.stop()
        await jobs.stop()
        await state.check_in_store.close()
        await state.ingest_store.close()

    app = FastAPI(
        title="EdgeFleet fleet server",
        version="0.1.0",
        description="Registry, devices, signed assignments, downloads and telemetry.",
        lifespan=lifespan,
    )
    app.state.fleet = state
    metrics = CollectorRegistry()
    requests = Counter(
        "edgefleet_http_requests_total", "HTTP requests", ["route", "status"], registry=metrics
    )
    latency = Histogram(
        "edgefleet_http_request_seconds", "HTTP request latency", ["route"], registry=metrics
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched; name those the
            # path is declared with (_allowed_methods).
            routes = [*app.router.routes, *(r for router in routers for r in router.routes)]
            headers["Allow"] = ", ".join(sorted(_allowed_methods(routes, request)))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    # Devices first: routes are matched in order (check-in and upload skip the matching:
    # server.hot_routes).
    routers: tuple[APIRouter, ...] = (
        devices.router,
        devices.fleet_router,
        telemetry.router,
        metrics_routes.router,
        rollouts.router,
        registry.router,
        registry.downloads,
        admin.router,
        webhooks.router,
    )
    for router in routers:
        app.include_router(router)
    install_dashboard(app)
    routers += (ui_router,)

    @app.get("/healthz", tags=["health"])
    def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Ready,
        responses={503: {"model": NotReady, "description": "The database does not answer."}},
    )
    def readyz() -> Ready | JSONResponse:
        """The database answers."""
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means not ready
            reason = NotReady(status="unavailable", reason=str(exc)[:200])
            return JSONResponse(reason.model_dump(), status_code=503)
        return Ready(status="ready", root_version=state.trusted.root.version)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PrometheusResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    def prometheus() -> Response:
        """Request counts and latencies in Prometheus' text format."""
        return PrometheusResponse(generate_latest(metrics))

    @app.get(
        "/v1/roots/{version}.json",
        tags=["trust"],
        response_class=Response,
        responses={
            200: {"model": RootEnvelope, "description": "That version of root.json."},
            404: {"model": Problem, "description": "No such version."},
        },
    )
    def root_version(version: int) -> Response:
        """Every version of the trusted root, so devices can follow rotations (byte for byte as
        signed)."""
        data = state.root_chain.get(version)
        if data is None:
            raise ApiError(404, f"no root version {version}; newest is {max(state.root_chain)}")
        return Response(data, media_type="application/json")

    # Added first, so it runs inside the request log (which labels by route).
    app.add_middleware(
        HotRoutes, fastapi_app=app, check_in=devices.check_in, upload=telemetry.upload
    )
    app.add_middleware(ObserveMiddleware, requests=requests, latency=latency)
    return app


async def _freeze_after(seconds: float) -> None:
    await asyncio.sleep(seconds)
    gc.collect()
    gc.freeze()


def _allowed_methods(routes: list[BaseRoute], request: Request) -> set[str]:
    """The methods the request's path is declared with (``routes``: the app's own and each
    included router's, since an included router's entry on the app names no methods).

    Of the routes whose path matches, those with the fewest parameters: ``/v1/devices/enroll``
    is declared for ``POST``, though ``GET /v1/devices/{device_id}`` matches it too.
    """
    matching: dict[int, set[str]] = {}
    for route in routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(request.scope)[0] != Match.NONE:
            parameters = getattr(route, "path", "").count("{")
            matching.setdefault(parameters, set()).update(methods)
    return matching[min(matching)] if matching else set()


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_LATEST


class ObserveMiddleware:
    """Counts, times and (at INFO) logs each request as one JSON line; plain ASGI, because
    Starlette's BaseHTTPMiddleware costs about a millisecond per request."""

    def __init__(self, app: Any, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        # Each label set's child, kept: ``labels()`` checks and joins its values on every call,
        # a few microseconds a request. Routes and status codes are few, so these stay small.
        self._counted: dict[tuple[str, str], Any] = {}
        self._timed: dict[str, Any] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "bytes": None}
        # Body bytes handed to the server; when a client goes away mid-body, uvicorn reports the
        # disconnect and the response stops, so this (unlike content-length) is what was served.
        sent = [0]

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                for key, value in message.get("headers", []):
                    if key == b"content-length":
                        status["bytes"] = value.decode()
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - start
            key = (path, str(status["code"]))
            counted = self._counted.get(key)
            if counted is None:
                counted = self._counted[key] = self.requests.labels(*key)
            counted.inc()
            timed = self._timed.get(path)
            if timed is None:
                timed = self._timed[path] = self.latency.labels(path)
            timed.observe(elapsed)
            if log.isEnabledFor(logging.INFO):
                headers = dict(scope.get("headers", []))
                log.info(
                    json.dumps(
                        {
                            "ts": datetime.now(UTC).isoformat(),
                            "pid": os.getpid(),
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status["code"],
                            "range": headers.get(b"range", b"").decode() or None,
                            "bytes": status["bytes"],
                            "bytes_sent": sent[0],
                            "ms": round(elapsed * 1e3, 2),
                        }
                    )
                )
