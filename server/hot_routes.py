"""The two routes every device calls on a timer, dispatched ahead of FastAPI's router.

Check-in and telemetry upload are most of what a fleet sends. For each, FastAPI's machinery
(matching the path against the routes one by one, solving the route's parameters, the exception
middleware, the exit-stack middleware) cost a quarter to a third of the whole request
(docs/scaling.md, "Hot routes"). Both endpoints already take just the device id and the request,
and read their bodies themselves; so this middleware matches their two paths with one regular
expression and calls the same endpoint functions directly.

The routes stay declared on FastAPI's router: the OpenAPI document describes them (a test holds
the two declarations and :data:`HOT_PATHS` together), and a request this middleware does not
take (another method, a device id outside the one rule) goes on to FastAPI and is answered as
before. An exception is answered by the app's own handler for its class, as FastAPI would, so
every error keeps its one shape (:mod:`server.app`); one without a handler goes on up to the
server error middleware (a 500).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from fastapi import FastAPI, Request, Response

from firmware_bundles.messages import DEVICE_ID_PATTERN

Endpoint = Callable[[str, Request], Awaitable[Response]]

#: The hot routes' paths, as declared on FastAPI's router (check-in, upload).
HOT_PATHS = ("/v1/devices/{device_id}/check-in", "/v1/devices/{device_id}/telemetry")
_PATH = re.compile(r"/v1/devices/([^/]+)/(check-in|telemetry)")
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class HotRoute(NamedTuple):
    """A hot path and its endpoint; put in the scope as the router puts its route (the request
    log labels each request with its route's ``path``)."""

    path: str
    endpoint: Endpoint


class HotRoutes:
    """ASGI middleware: ``POST`` to a hot path with a well-formed device id goes straight to
    the route's endpoint; everything else to ``app``."""

    def __init__(
        self, app: Any, fastapi_app: FastAPI, check_in: Endpoint, upload: Endpoint
    ) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.routes = {
            "check-in": HotRoute(HOT_PATHS[0], check_in),
            "telemetry": HotRoute(HOT_PATHS[1], upload),
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _PATH.fullmatch(scope["path"])
            if match is not None and _DEVICE_ID.fullmatch(match[1]):
                await self._serve(match[1], self.routes[match[2]], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, device_id: str, route: HotRoute, scope: Any, receive: Any, send: Any
    ) -> None:
        # What the router would have put in the scope.
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {"device_id": device_id}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(device_id, request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for ``exc``'s class or its nearest base, as Starlette looks it
        up."""
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return handlers[cls]
        return None
