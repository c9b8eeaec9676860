"""Errors raised by the device agent, one root split by who is at fault.

AgentError                 (``retryable``: may the same request succeed if sent again later?)
├── ConfigError           the agent cannot start as configured (missing root, unknown target)
├── TrustError            something offered did not verify (kind, model, reason)
├── DownloadError         a bundle could not be fetched as assigned
│   ├── StallError        no bytes arrived for ``stall_timeout_s``                 (retryable)
│   ├── ResumeRefused     the server would not continue the partial: start at 0    (retryable)
│   ├── DeadlineError     the download took longer than ``download_deadline_s``
│   ├── OversizeError     the server sent more bytes than the assignment's length
│   └── NotOfferedError   the server no longer has the bundle (404/410)
├── InstallError          a verified bundle could not be installed
│   └── SelfTestError     the manifest's self-test vectors failed; the install was reverted
├── InputError            predict inputs do not match the manifest's schema
├── InferenceError        ONNX Runtime failed on inputs that passed the schema check
├── UnknownModelError     no active model of that name
├── ServerError           the fleet server could not be used
│   ├── ServerUnreachable connection refused, timed out, or a gateway said so       (retryable)
│   ├── AuthError         401/403: the credential is not accepted
│   └── ServerRejected    any other refusal (status, detail)            (retryable on 429, 5xx)
│       ├── InvalidRequest  400/413/422: never accepted as sent (a batch is dropped)
│       └── NotFound        404/410: no such thing on the server
├── OutboxError           the telemetry outbox (SQLite) cannot be opened or written
└── LinkError             a device link failed (issue 6)

HTTP statuses and httpx errors become these in one place, :mod:`device_agent.client` (its module
docstring has the table); nothing else looks at a status code.

Foreign errors (httpx, firmware_bundles, OSError) are mapped where they enter, with ``raise ...
from exc`` so the original stays on ``__cause__``.
"""

from __future__ import annotations

from typing import Literal

#: Why a trust decision failed; tests and status reports match on it.
TrustKind = Literal[
    "signature",  # a signature threshold was not met (assignment, bundle or root)
    "wrong-device",  # the assignment names another device id
    "wrong-hardware",  # the assignment names another hardware id
    "replay",  # the assignment carries another nonce than the one sent
    "expired",  # the assignment or the trusted root has expired
    "rollback",  # a release counter or root version went back
    "mismatch",  # bundle bytes differ from the assignment (hash, length, name, version)
    "archive",  # the archive is unsafe or a file's hash or length is wrong
    "target",  # the bundle is not built for, or does not fit, this device
    "schema",  # a document is malformed
]


class AgentError(Exception):
    """Root of every error raised by ``device_agent``.

    Attributes:
        retryable: Whether the same request may succeed if it is sent again later (a retry loop
            decides on it; the error's class says who is at fault).
    """

    retryable: bool = False


class ConfigError(AgentError):
    """The agent cannot start as configured (a missing file, an unknown target id)."""


class TrustError(AgentError):
    """Something the server offered did not verify.

    Attributes:
        kind: Which check failed (see :data:`TrustKind`).
        model: The model concerned, if known.
        reason: Human-readable reason, naming the failed check.
    """

    def __init__(self, kind: TrustKind, reason: str, model: str | None = None) -> None:
        self.kind = kind
        self.model = model
        self.reason = reason
        where = f" ({model})" if model else ""
        super().__init__(f"untrusted{where}: {kind}: {reason}")


class DownloadError(AgentError):
    """A bundle could not be fetched as assigned.

    Attributes:
        url: The URL being fetched.
        received_bytes: Bytes of the bundle on disk when the error was raised.
    """

    def __init__(self, message: str, url: str = "", received_bytes: int = 0) -> None:
        self.url = url
        self.received_bytes = received_bytes
        super().__init__(message)


class StallError(DownloadError):
    """No bytes arrived for ``stall_timeout_s`` (slow-retrieval defence)."""

    retryable = True


class ResumeRefused(DownloadError):
    """The server would not continue the partial download (416, or a 206 whose Content-Range
    is unusable or starts elsewhere): the partial is dropped and the next attempt starts at 0."""

    retryable = True


class DeadlineError(DownloadError):
    """The whole download took longer than ``download_deadline_s``."""


class OversizeError(DownloadError):
    """The server sent, or announced, more bytes than the assignment's length (endless data)."""


class NotOfferedError(DownloadError):
    """The server answered 404 or 410: it no longer offers the bundle."""


class InstallError(AgentError):
    """A verified bundle could not be installed.

    Attributes:
        model: The model being installed.
    """

    def __init__(self, message: str, model: str) -> None:
        self.model = model
        super().__init__(message)


class SelfTestError(InstallError):
    """The manifest's self-test vectors failed on this device; the install was reverted.

    Attributes:
        detail: What the self-test reported (worst error, which vector).
    """

    def __init__(self, message: str, model: str, detail: str = "") -> None:
        self.detail = detail
        super().__init__(message, model)


class InputError(AgentError):
    """Predict inputs do not match the model's input schema.

    Attributes:
        model: The model called.
        input: The input name concerned.
        expected: What the manifest declares (shape, dtype, feature count).
        got: What was passed.
    """

    def __init__(self, model: str, input: str, expected: str, got: str) -> None:
        self.model = model
        self.input = input
        self.expected = expected
        self.got = got
        super().__init__(f"{model}: input {input!r} expected {expected}, got {got}")


class InferenceError(AgentError):
    """ONNX Runtime failed on inputs that passed the schema check.

    Attributes:
        model: The model called.
        detail: ONNX Runtime's message.
    """

    def __init__(self, model: str, detail: str) -> None:
        self.model = model
        self.detail = detail
        super().__init__(f"{model}: inference failed: {detail}")


class UnknownModelError(AgentError):
    """No active model of that name is installed.

    Attributes:
        model: The name asked for.
        known: Names of the models that are active.
    """

    def __init__(self, model: str, known: list[str]) -> None:
        self.model = model
        self.known = known
        names = ", ".join(known) if known else "none"
        super().__init__(f"no active model {model!r}; active: {names}")


class ServerError(AgentError):
    """The fleet server could not be used."""


class ServerUnreachable(ServerError):
    """Connection refused, timed out, or a gateway answered 502-504: the agent is offline."""

    retryable = True


class AuthError(ServerError):
    """The server refused the credential (401/403).

    Attributes:
        status: The HTTP status.
        detail: The server's reason.
    """

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"server refused the credential ({status}): {detail}")


class ServerRejected(ServerError):
    """The server refused a request for another reason.

    Attributes:
        status: The HTTP status.
        detail: The server's reason.
        retryable: True for 429 (too many requests) and 5xx (the server's own trouble).
    """

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        self.retryable = status == 429 or status >= 500
        super().__init__(f"server answered {status}: {detail}")


class InvalidRequest(ServerRejected):
    """400, 413 or 422: the server will never accept this request as it was sent (a telemetry
    batch so refused is dropped and counted)."""


class NotFound(ServerRejected):
    """404 or 410: the server has no such thing (a newer root, a device)."""


class OutboxError(AgentError):
    """The telemetry outbox (SQLite under the state dir) cannot be opened or written."""


class LinkError(AgentError):
    """A device link (serial, BLE) failed; refined in issue 6."""
