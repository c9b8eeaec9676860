"""The agent's local API: JSON lines over a Unix socket in the state dir, server and client.

Apps on the device, and ``edgefleet agent status|predict``, reach a running agent here. Each
request is one JSON object on one line, each answer one line: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"type": ..., "message": ...}}``. Operations::

    {"op": "status"}
    {"op": "predict", "model": NAME, "inputs": nested lists | {input name: nested lists}}
    {"op": "feedback", "model": NAME, "kind": KIND}
    {"op": "label", "model": NAME, "label": LABEL, "predicted": LABEL | null,
     "predicted_at": ISO 8601 TIME WITH OFFSET, "version": VERSION}
    {"op": "check-in-now"}

A label with ``predicted_at`` and ``version`` counts in that version's window of that time
(after a version switch too); one with neither, in the active version's current window.

The socket is mode 0600 (only the agent's user may talk to it) and the server is threaded, so a
prediction never waits for a check-in in progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.errors import AgentError

#: Default cap on one request line (inputs travel as JSON, so a large batch is several MB).
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Default time a client waits for an answer (a prediction on a small model takes milliseconds).
DEFAULT_CLIENT_TIMEOUT_S = 30.0
SOCKET_NAME = "agent.sock"


def socket_path(state_dir: Path) -> Path:
    """Where the agent with this state dir listens."""
    return Path(state_dir) / SOCKET_NAME


class LocalApiError(AgentError):
    """An error answered by the agent over the local API, or a failure to reach it.

    Attributes:
        type: The agent-side error class (``UnknownModelError``, ``InputError``, ...) or
            ``BadRequest`` / ``InternalError`` / ``AgentNotRunning``.
        message: What went wrong, for a person.
    """

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


class AgentNotRunning(LocalApiError):
    """Nothing listens on the socket (no agent started with this state dir)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            "AgentNotRunning",
            f"no agent socket at {path}; start one with `edgefleet agent run`",
        )
        self.path = path


class AgentAlreadyRunning(AgentError):
    """Another agent already runs on this state dir (holds its lock or answers on its socket).

    Attributes:
        path: The lock file or socket that is taken.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"another agent is already running with {path}")
        self.path = path


class BadRequest(Exception):
    """A request that is not JSON, names no known operation, or lacks a field (local use)."""


class AgentApi(Protocol):
    """What the local API needs of the agent (``device_agent.agent.Agent`` provides it)."""

    def status(self) -> dict[str, Any]: ...

    def predict(self, model: str, inputs: Any) -> Mapping[str, np.ndarray]: ...

    def feedback(self, model: str, kind: str) -> None: ...

    def label(
        self,
        model: str,
        label: Any,
        predicted: Any = None,
        *,
        predicted_at: str | None = None,
        version: str | None = None,
    ) -> None: ...


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars as lists and plain numbers, for ``json.dumps``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _field(request: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in request:
        raise BadRequest(f"op {request.get('op')!r} needs the field {name!r}")
    value = request[name]
    if not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {getattr(kind, '__name__', kind)}")
    return value


def _optional(request: Mapping[str, Any], name: str, kind: type) -> Any:
    value = request.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {kind.__name__} or null")
    return value


class LocalApi:
    """Dispatches requests to the agent; the socket server below is its transport.

    Args:
        agent: The agent (thread-safe: requests arrive on several threads at once); None until
            :meth:`attach`.
        check_in_now: Asks the runner to check in at once (wakes its wait).
    """

    def __init__(
        self, agent: AgentApi | None = None, check_in_now: Callable[[], None] | None = None
    ) -> None:
        self.agent = agent
        self.check_in_now = check_in_now

    def attach(self, agent: AgentApi, check_in_now: Callable[[], None] | None = None) -> None:
        """Serve ``agent`` (the socket may be bound before the agent is built)."""
        self.agent = agent
        self.check_in_now = check_in_now

    def handle_line(self, line: bytes) -> bytes:
        """One request line in, one answer line out (never raises)."""
        try:
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"request is not JSON: {exc}") from exc
            if not isinstance(request, dict):
                raise BadRequest("request must be a JSON object")
            answer: dict[str, Any] = {"ok": True, "result": self.dispatch(request)}
        except BadRequest as exc:
            answer = {"ok": False, "error": {"type": "BadRequest", "message": str(exc)}}
        except AgentError as exc:
            answer = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
        except Exception as exc:  # the agent must keep serving whatever one request does
            answer = {
                "ok": False,
                "error": {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}"},
            }
        return json.dumps(answer, default=_jsonable).encode() + b"\n"

    def dispatch(self, request: Mapping[str, Any]) -> Any:
        """Run one request.

        Raises:
            BadRequest: Unknown operation or missing/mistyped field.
            AgentError: Whatever the agent raises (unknown model, bad inputs, ...).
        """
        op = request.get("op")
        agent = self.agent
        if agent is None:
            raise AgentError("the agent is still starting; try again in a moment")
        if op == "status":
            return agent.status()
        if op == "predict":
            model = _field(request, "model", str)
            inputs = _field(request, "inputs", (list, dict, int, float))
            outputs = agent.predict(model, inputs)
            return {"model": model, "outputs": dict(outputs)}
        if op == "feedback":
            agent.feedback(_field(request, "model", str), _field(request, "kind", str))
            return {"recorded": True}
        if op == "label":
            agent.label(
                _field(request, "model", str),
                _field(request, "label", (str, int)),
                request.get("predicted"),
                predicted_at=_optional(request, "predicted_at", str),
                version=_optional(request, "version", str),
            )
            return {"recorded": True}
        if op == "check-in-now":
            if self.check_in_now is None:
                raise BadRequest("this agent does not run a check-in loop")
            self.check_in_now()
            return {"scheduled": True}
        raise BadRequest(
            f"unknown op {op!r}; expected one of status, predict, feedback, label, check-in-now"
        )


class _Handler(socketserver.StreamRequestHandler):
    server: LocalApiServer

    def handle(self) -> None:
        limit = self.server.max_request_bytes
        while True:
            line = self.rfile.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                message = f"request over {limit} bytes"
                self.wfile.write(
                    json.dumps(
                        {"ok": False, "error": {"type": "BadRequest", "message": message}}
                    ).encode()
                    + b"\n"
                )
                return  # the rest of the line is unread: drop the connection
            if not line.strip():
                continue
            self.wfile.write(self.server.api.handle_line(line))
            self.wfile.flush()


class LocalApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded Unix socket server at ``path`` (mode 0600) answering through ``api``.

    Raises:
        AgentAlreadyRunning: If another process answers on ``path``.
    """

    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self,
        path: Path,
        api: LocalApi,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.path = Path(path)
        self.api = api
        self.max_request_bytes = max_request_bytes
        _clear_stale_socket(self.path)
        # Bind under a umask that leaves no window in which others could connect.
        old = os.umask(0o177)
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="local-api", kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by an agent that died; refuse if one still answers there."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise AgentAlreadyRunning(path)


class LocalApiClient:
    """A client of a running agent's local API.

    Args:
        path: The socket (``socket_path(state_dir)``).
        timeout_s: How long to wait for an answer.
    """

    def __init__(self, path: Path, *, timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s

    def call(self, op: str, **fields: Any) -> Any:
        """Send one request and return its result.

        Raises:
            AgentNotRunning: If nothing listens on the socket.
            LocalApiError: If the agent answers with an error (``type`` names it).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentNotRunning(self.path) from exc
            except OSError as exc:
                raise LocalApiError(
                    "AgentNotRunning", f"cannot connect to {self.path}: {exc.strerror or exc}"
                ) from exc
            try:
                payload = json.dumps({"op": op, **fields}, default=_jsonable).encode()
                sock.sendall(payload + b"\n")
                with sock.makefile("rb") as reader:
                    line = reader.readline()
            except OSError as exc:
                raise LocalApiError(
                    "ConnectionError", f"agent at {self.path} did not answer: {exc}"
                ) from exc
        finally:
            sock.close()
        if not line:
            raise LocalApiError("ConnectionError", f"agent at {self.path} closed the connection")
        answer = json.loads(line)
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise LocalApiError(
                str(error.get("type", "Error")), str(error.get("message", "unknown error"))
            )
        return answer.get("result")

    def status(self) -> dict[str, Any]:
        """The agent's status (see ``Agent.status``)."""
        result: dict[str, Any] = self.call("status")
        return result

    def predict(self, model: str, inputs: Any) -> dict[str, Any]:
        """Outputs by name (nested lists) for ``inputs`` (arrays, lists or a name mapping)."""
        result: dict[str, Any] = self.call("predict", model=model, inputs=inputs)["outputs"]
        return result

    def feedback(self, model: str, kind: str) -> None:
        self.call("feedback", model=model, kind=kind)

    def label(
        self,
        model: str,
        label: Any,
        predicted: Any = None,
        predicted_at: str | None = None,
        version: str | None = None,
    ) -> None:
        """Count a late label; with ``predicted_at`` (ISO 8601 with offset) and ``version``, for
        the prediction that version made then."""
        fields: dict[str, Any] = {"model": model, "label": label, "predicted": predicted}
        if predicted_at is not None or version is not None:
            fields.update(predicted_at=predicted_at, version=version)
        self.call("label", **fields)

    def check_in_now(self) -> None:
        """Ask the agent to check in at once instead of waiting for its interval."""
        self.call("check-in-now")
