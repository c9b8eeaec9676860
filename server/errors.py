"""Server errors, split by fault; each carries the HTTP status it maps to.

ServerError
├── ConfigError        the server cannot start as configured (not an HTTP error)
├── SchemaBehindError  the database needs `edgefleet db upgrade`
└── ApiError           a request is refused (status, reason)
"""

from __future__ import annotations


class ServerError(Exception):
    """Root of every error raised by ``server``."""


class ConfigError(ServerError):
    """The server cannot start as configured."""


class SchemaBehindError(ConfigError):
    """The database schema is older than this server's migrations."""


class ApiError(ServerError):
    """A request refused with an HTTP status and a reason the client can act on."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)
