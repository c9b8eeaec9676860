"""Several server processes on one port: ``edgefleet serve --workers N`` (docs/scaling.md).

uvicorn starts the workers and hands them one listening socket; each builds its own state from
the settings the parent resolved, passed in :data:`SETTINGS_ENV`. Workers share nothing but the
database and the blob directory: caches are dropped across processes by
:mod:`server.invalidation`, and the periodic jobs (rollout evaluator, retention, outbound
deliveries, threshold checks) each run in one process at a time under a lease in ``job_lock``
(:mod:`server.jobs`), which another process takes over when its holder dies.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys

from fastapi import FastAPI
from pydantic import SecretStr

from server.config import Settings
from server.errors import ConfigError

#: The parent's resolved settings, as JSON, and its log level, for the workers.
SETTINGS_ENV = "EDGEFLEET_WORKER_SETTINGS"
LOG_LEVEL_ENV = "EDGEFLEET_WORKER_LOG_LEVEL"


def configure_logging(level: str) -> None:
    """Log lines as bare messages on standard output (``info``: one JSON line per request)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(message)s", stream=sys.stdout
    )


def refuse_unless_shared(settings: Settings, workers: int) -> None:
    """Raises:
    ConfigError: naming why, if ``workers`` processes cannot share ``settings``' database.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    url = settings.resolved_database_url()
    if workers > 1 and not url.startswith("postgresql"):
        raise ConfigError(
            f"--workers {workers} needs PostgreSQL (--database-url postgresql+psycopg://...):"
            " SQLite lets one process write at a time, so more workers would only queue on its"
            " lock; the embedded default serves from one process"
        )


def settings_env(settings: Settings) -> str:
    """``settings`` as the JSON a worker reads back (secrets included: the environment of the
    server's own child processes)."""
    values = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            values[name] = value.get_secret_value()
    return json.dumps(values)


def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Run ``workers`` processes of :func:`app` on one listening socket until stopped.

    As ``uvicorn.run(..., workers=N)`` does, but the shared socket gets ``TCP_NODELAY`` first:
    uvicorn binds it with protocol 0, so asyncio does not set the option on the connections it
    accepts (it checks for ``IPPROTO_TCP``), and every answer written in two pieces waits for the
    client's delayed ACK: about 40 ms a request (check-in fell from 1,583 to 329 requests/s with
    two workers). Accepted connections inherit the option from the listening socket.
    """
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "server.workers:app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()


def app() -> FastAPI:
    """The application of one worker (uvicorn's factory): state from :data:`SETTINGS_ENV`."""
    from server.app import build_state, create_app

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    settings = Settings.model_validate(json.loads(os.environ[SETTINGS_ENV]))
    application = create_app(build_state(settings), freeze_when_settled=True)
    # What start-up allocated lives as long as the process: keep it out of the collector's scans.
    gc.collect()
    gc.freeze()
    return application
