"""The agent as a long-running process: enroll, check in on a jittered interval, back off while
offline, upload telemetry whenever the server answers, serve the local API, stop cleanly.

``edgefleet agent run`` calls :func:`run`. Each event is one JSON line on stderr (``event`` is
``started``, ``enrolled``, ``check-in``, ``install``, ``upload``, ``backoff``, ``error``,
``stopping``, ``stopped``), so a supervisor or a test reads what happened without parsing prose.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

from device_agent.agent import Agent
from device_agent.config import AgentSettings
from device_agent.errors import AgentError, AuthError, ConfigError, ServerUnreachable
from device_agent.local_api import AgentAlreadyRunning, LocalApi, LocalApiServer, socket_path
from device_agent.telemetry_upload import UploadResult
from device_agent.updater import CheckInResult

#: Exit codes of :func:`run`.
EXIT_OK = 0
EXIT_ENROLL_REFUSED = 2
LOCK_FILE = "agent.lock"
T = TypeVar("T")


def _plain(value: Any) -> Any:
    """Results (dataclasses, pydantic models, enums, paths, datetimes) as JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class EventLog:
    """One JSON object per line on ``stream``; lines from several threads never interleave."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"ts": datetime.now(UTC).isoformat(), "event": event, **_plain(fields)}
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class Runner:
    """Drives one :class:`~device_agent.agent.Agent` until :meth:`stop`.

    Args:
        settings: The agent's settings (intervals, backoff, jitter).
        agent: The agent to drive.
        log: Where events go (JSON lines on stderr by default).
        rng: Randomness for jitter (seeded in tests that look at delays).
    """

    def __init__(
        self,
        settings: AgentSettings,
        agent: Agent,
        *,
        log: Callable[..., None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.agent = agent
        self.log = log if log is not None else EventLog()
        self.rng = rng if rng is not None else random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.failures = 0

    # -- control, from signal handlers and the local API ---------------------------------------

    def stop(self) -> None:
        """Finish the current round, then shut down."""
        self._stop.set()
        self._wake.set()

    def check_in_now(self) -> None:
        """Cut the current wait short (the local API's ``check-in-now``)."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- delays ----------------------------------------------------------------------------------

    def _jitter(self, seconds: float) -> float:
        spread = self.settings.check_in_jitter
        return max(0.0, seconds * self.rng.uniform(1.0 - spread, 1.0 + spread))

    def interval_s(self) -> float:
        """The wait before the next check-in while the server answers."""
        return self._jitter(self.settings.check_in_interval_s)

    def backoff_s(self, failures: int) -> float:
        """The wait after ``failures`` unreachable rounds in a row: doubling, capped, jittered."""
        # The exponent stops growing once past any cap (2**64 s is longer than any outage), so
        # a device offline for weeks does not overflow.
        base = self.settings.backoff_initial_s * 2.0 ** min(max(0, failures - 1), 64)
        return min(self.settings.backoff_max_s, self._jitter(base))

    def _wait(self, seconds: float) -> None:
        self._wake.wait(timeout=seconds)
        self._wake.clear()

    # -- the loop --------------------------------------------------------------------------------

    def serve(self) -> int:
        """Run rounds until stopped, then flush telemetry; returns the exit code."""
        self.log(
            "started",
            device_id=self.agent.device_id,
            hardware_id=self.settings.hardware_id,
            server=self.settings.server_url,
            socket=socket_path(self.settings.state_dir),
        )
        code = EXIT_OK
        try:
            code = self._loop()
        finally:
            self.log("stopping")
            self.agent.close()  # flushes buffered telemetry into the outbox
            self.log("stopped", code=code)
        return code

    def _loop(self) -> int:
        enrolled = False
        while not self.stopping:
            if not enrolled:
                try:
                    self.agent.enroll()
                    enrolled = True
                    self.log("enrolled", device_id=self.agent.device_id)
                except ServerUnreachable as exc:
                    self._back_off(exc, "enroll")
                    continue
                except AuthError as exc:
                    # A refused enrollment token will not start working by itself.
                    self.log("error", step="enroll", type=type(exc).__name__, message=str(exc))
                    return EXIT_ENROLL_REFUSED
                except AgentError as exc:
                    self.log("error", step="enroll", type=type(exc).__name__, message=str(exc))
                    self._wait(self.backoff_s(self.failures + 1))
                    continue
            self.round()
        return EXIT_OK

    def round(self) -> None:
        """One check-in and one telemetry upload, then the wait before the next round.

        The upload is tried even when the check-in found the server gone: it first aggregates
        buffered inferences and closes due windows into the durable outbox, so telemetry made
        offline is on disk (and in the status) however long the outage lasts.
        """
        unreachable = self._check_in()
        if not self.stopping:
            unreachable = self._upload() or unreachable
        if unreachable is None:
            self.failures = 0
            self._wait(self.interval_s())
        else:
            self._back_off(unreachable)

    def _step(
        self, event: str, step: Callable[[], T], done: Callable[[T], None]
    ) -> ServerUnreachable | None:
        """Run one step of a round and hand its result to ``done``; log a failure under
        ``event``. The error if the server could not be reached, else None."""
        try:
            result = step()
        except ServerUnreachable as exc:
            self.log(event, outcome="unreachable", message=str(exc))
            return exc
        except AgentError as exc:
            # The server answered (so it is reachable) but the step failed: say why and go on.
            self.log(
                event, outcome="error", type=type(exc).__name__, message=str(exc), **_fields(exc)
            )
            return None
        done(result)
        return None

    def _check_in(self) -> ServerUnreachable | None:
        """Check in and log the outcome; the error if the server could not be reached."""
        return self._step("check-in", self.agent.check_in, self._checked_in)

    def _checked_in(self, result: CheckInResult) -> None:
        record = _plain(result)
        installs = record.pop("installs", []) if isinstance(record, dict) else []
        models = {i.get("model"): i.get("action") for i in installs if isinstance(i, dict)}
        self.log("check-in", outcome="ok", models=models, **record)
        for install in installs:
            # An unchanged model is already in the check-in line; installs, waits and failures
            # get a line of their own.
            if isinstance(install, dict) and install.get("action") != "current":
                self.log("install", **install)

    def _upload(self) -> ServerUnreachable | None:
        """Upload closed telemetry windows and log the outcome; the error if offline."""
        return self._step("upload", self.agent.upload_telemetry, self._uploaded)

    def _uploaded(self, result: UploadResult) -> None:
        record = _plain(result)
        self.log("upload", outcome="ok", **(record if isinstance(record, dict) else {}))

    def _back_off(self, exc: Exception, step: str = "round") -> None:
        self.failures += 1
        delay = self.backoff_s(self.failures)
        self.log(
            "backoff", step=step, attempt=self.failures, delay_s=round(delay, 3), reason=str(exc)
        )
        self._wait(delay)


def _fields(exc: AgentError) -> dict[str, Any]:
    """An error's structured fields (model, reason, status, ...) for its log line."""
    skip = {"args", "with_traceback", "add_note"}
    return {
        k: _plain(v)
        for k, v in vars(exc).items()
        if not k.startswith("_") and k not in skip and k not in ("type", "message")
    }


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``<state_dir>/agent.lock`` for this process's life (the kernel drops it on any exit,
    SIGKILL included), so two agents never share a state dir.

    Returns:
        The lock file's descriptor (closing it releases the lock).

    Raises:
        AgentAlreadyRunning: If another process holds it.
        ConfigError: If the state dir cannot be created.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"state dir {state_dir} is not usable: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise AgentAlreadyRunning(state_dir / LOCK_FILE) from exc
    return fd


def run(settings: AgentSettings, *, log_stream: TextIO | None = None) -> int:
    """Run the agent and its local API until SIGTERM or SIGINT; returns the exit code.

    The first signal finishes the round in progress and shuts down (telemetry flushed to the
    outbox); a second one interrupts at once, which the slots and the outbox survive as they
    survive a crash.

    Raises:
        AgentAlreadyRunning: If another agent runs on the same state dir.
        ConfigError: If the agent cannot start as configured (root file, target id, state dir).
    """
    lock = lock_state_dir(settings.state_dir)
    try:
        api = LocalApi()
        server = LocalApiServer(socket_path(settings.state_dir), api)
        try:
            agent = Agent(settings)
            runner = Runner(settings, agent, log=EventLog(log_stream))
            api.attach(agent, runner.check_in_now)
            server.start()
            return _serve_until_signalled(runner)
        finally:
            server.stop()
    finally:
        os.close(lock)


def _serve_until_signalled(runner: Runner) -> int:
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def on_signal(signum: int, _: FrameType | None) -> None:
        if runner.stopping:
            raise KeyboardInterrupt
        runner.log("signal", signal=signal.Signals(signum).name)
        runner.stop()

    for s in signals:
        signal.signal(s, on_signal)
    try:
        return runner.serve()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
