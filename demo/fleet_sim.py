"""A simulated fleet (a simulator, named as one): many devices in one process, each running the
real agent (:class:`device_agent.agent.Agent`) with its own state directory, trust state, slots
and durable telemetry outbox, checking in and uploading over real HTTP to a real server.

What is simulated is the world around the agents: who is online, what the users feed the model,
and each device's clock. Device clocks are device-side: the fleet can play days of the devices'
past in seconds (:meth:`SimulatedFleet.play_history`), so their telemetry windows carry event times
days old; the server never sees anything but its own real clock and the event times devices send.
Device clocks never run past the server's now: a window from the future would fall outside a
rollout's comparison (the 100% stage's control data ends at the previous stage's end, in real
time) and would show as days to come on the dashboard.

To keep a thousand devices cheap, the agents share one HTTP connection pool and one ONNX Runtime
session per bundle (sessions are immutable; each agent still loads, verifies and self-tests every
bundle it installs, and records its own telemetry).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from device_agent.agent import Agent
from device_agent.config import AgentSettings
from device_agent.errors import AgentError
from device_agent.runtime import ModelRuntime


class DeviceClock:
    """The fleet's device-side clock: the real time less a lag (days during a history replay)."""

    def __init__(self) -> None:
        self.lag_s = 0.0

    def __call__(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self.lag_s)


class _Connected:
    """Network and power conditions of a simulated device: on Wi-Fi and charging."""

    def unmetered(self) -> bool:
        return True

    def charging(self) -> bool:
        return True


@dataclass
class FleetSettings:
    """How the simulated devices behave; times in real seconds."""

    check_in_interval_s: float = 30.0
    upload_interval_s: float = 60.0
    telemetry_window_s: int = 60
    #: Predictions each online device makes per tick, and the share of them a user labels.
    predictions_per_tick: int = 2
    label_share: float = 0.5
    threads: int = 6


@dataclass
class SimDevice:
    """One simulated device: the real agent and the simulator's view of its world."""

    agent: Agent
    hardware_id: str
    rng: np.random.Generator
    online: bool = True
    next_check_in: float = 0.0
    next_upload: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class TickStats:
    """What the fleet did in one tick, summed over devices."""

    predictions: int = 0
    check_ins: int = 0
    windows_sent: int = 0
    errors: int = 0


class SimulatedFleet:
    """``count`` devices of ``hardware_mix`` (hardware id -> share), enrolled with ``enroll_token``.

    Args:
        server_url: The fleet server.
        root_path: The trusted root every device pins (the server's, out of band).
        enroll_token: A token that may enroll every device.
        state_dir: Each device's state goes in a directory under this one.
        count: How many devices.
        seed: Seeds which inputs each device sees and who goes offline.
        data: Inputs the users feed the model and their true labels.
        model: The model the devices run.
        hardware_mix: Hardware id -> share of the fleet.
        settings: Intervals and load.
    """

    def __init__(
        self,
        *,
        server_url: str,
        root_path: Path,
        enroll_token: str,
        state_dir: Path,
        count: int,
        seed: int,
        data: tuple[np.ndarray, np.ndarray],
        model: str,
        hardware_mix: dict[str, float],
        settings: FleetSettings | None = None,
    ) -> None:
        self.settings = settings or FleetSettings()
        self.clock = DeviceClock()
        self.model = model
        self.x, self.y = data
        self.runtime = ModelRuntime()
        self.http = httpx.Client(
            timeout=60.0, limits=httpx.Limits(max_connections=2 * self.settings.threads)
        )
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="fleet-use")
        self._network = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="fleet-net")
        self._lock = threading.Lock()
        self.totals = TickStats()
        rng = np.random.default_rng(seed)
        kinds = list(hardware_mix)
        shares = np.array([hardware_mix[k] for k in kinds], dtype=float)
        picks = rng.choice(len(kinds), size=count, p=shares / shares.sum())
        self.devices: list[SimDevice] = []
        self._make_agent = lambda i, hardware_id: Agent(
            AgentSettings(
                server_url=server_url,
                state_dir=state_dir / f"{hardware_id}-{i:04d}",
                root_path=root_path,
                hardware_id=hardware_id,
                device_id=f"{hardware_id}-{i:04d}",
                enroll_token=enroll_token,
                telemetry_window_s=self.settings.telemetry_window_s,
                telemetry_flush_every=64,
                upload_batch_windows=200,
                http_timeout_s=60,
                max_download_attempts=2,
            ),
            http=self.http,
            conditions=_Connected(),
            clock=self.clock,
            runtime=self.runtime,
        )
        self._plan = [
            (i, kinds[int(p)], np.random.default_rng([seed, i])) for i, p in enumerate(picks)
        ]

    # -- life cycle ---------------------------------------------------------------------------

    def _map(
        self,
        fn: Callable[[Any], TickStats],
        items: Iterable[Any],
        pool: ThreadPoolExecutor | None = None,
    ) -> TickStats:
        total = TickStats()
        for stats in (pool or self._pool).map(fn, list(items)):
            total.predictions += stats.predictions
            total.check_ins += stats.check_ins
            total.windows_sent += stats.windows_sent
            total.errors += stats.errors
        with self._lock:
            for name in ("predictions", "check_ins", "windows_sent", "errors"):
                setattr(self.totals, name, getattr(self.totals, name) + getattr(total, name))
        return total

    def enroll_and_install(self) -> TickStats:
        """Make every device's agent, enroll it and run its first check-in (installs what the
        server assigns)."""

        def make(plan: tuple[int, str, np.random.Generator]) -> SimDevice:
            i, hardware_id, rng = plan
            return SimDevice(self._make_agent(i, hardware_id), hardware_id, rng)

        self.devices = list(self._pool.map(make, self._plan))
        return self._map(lambda d: self._check_in(d, time.monotonic()), self.devices, self._network)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._network.shutdown(wait=True, cancel_futures=True)
        for device in self.devices:
            device.agent.close()
        self.http.close()

    # -- what a device does ---------------------------------------------------------------------

    def _error(self, device: SimDevice, exc: Exception) -> TickStats:
        device.errors.append(f"{type(exc).__name__}: {exc}")
        del device.errors[:-5]
        return TickStats(errors=1)

    def _check_in(self, device: SimDevice, now: float) -> TickStats:
        jitter = 1 + 0.2 * (device.rng.random() - 0.5)
        device.next_check_in = now + self.settings.check_in_interval_s * jitter
        try:
            device.agent.check_in()
        except AgentError as exc:
            return self._error(device, exc)
        return TickStats(check_ins=1)

    def _predict(self, device: SimDevice, count: int) -> int:
        made = 0
        for _ in range(count):
            row = int(device.rng.integers(len(self.x)))
            try:
                out = device.agent.predict(self.model, self.x[row : row + 1])
            except AgentError:
                continue  # nothing installed yet (a new device) or an unreadable slot
            made += 1
            if device.rng.random() < self.settings.label_share:
                predicted = int(np.asarray(next(iter(out.values()))).reshape(1, -1).argmax())
                try:
                    device.agent.label(self.model, int(self.y[row]), predicted)
                except AgentError as exc:
                    self._error(device, exc)
        return made

    def _upload(self, device: SimDevice, now: float) -> TickStats:
        device.next_upload = now + self.settings.upload_interval_s
        try:
            sent = device.agent.upload_telemetry()
        except AgentError as exc:
            return self._error(device, exc)
        return TickStats(windows_sent=sent.windows_sent)

    def _use(self, devices: list[SimDevice]) -> TickStats:
        """The users of ``devices`` make their predictions (online or not)."""
        count = self.settings.predictions_per_tick
        return TickStats(predictions=sum(self._predict(d, count) for d in devices))

    def _sync(self, device: SimDevice) -> TickStats:
        """Check in and upload, each when due."""
        now = time.monotonic()
        stats = TickStats()
        if now >= device.next_check_in:
            done = self._check_in(device, now)
            stats.check_ins, stats.errors = done.check_ins, done.errors
        if now >= device.next_upload:
            done = self._upload(device, now)
            stats.windows_sent, stats.errors = done.windows_sent, stats.errors + done.errors
        return stats

    # -- the simulation ---------------------------------------------------------------------------

    def play_history(self, days: float, step_h: float, per_step: int) -> TickStats:
        """Play the devices' last ``days`` in device time, a step of ``step_h`` hours at a time:
        each device predicts ``per_step`` inputs per step, offline (no check-in, no upload), so
        its outbox holds windows with event times from ``days`` ago up to now."""
        steps = int(days * 24 / step_h)
        total = TickStats()
        for k in range(steps, 0, -1):
            self.clock.lag_s = k * step_h * 3600
            chunks = [self.devices[i : i + 50] for i in range(0, len(self.devices), 50)]
            done = self._map(
                lambda c: TickStats(predictions=sum(self._predict(d, per_step) for d in c)), chunks
            )
            total.predictions += done.predictions
        self.clock.lag_s = 0.0
        return total

    def tick(self) -> TickStats:
        """Every device's users predict (in chunks, so a slow server never slows inference)."""
        chunks = [self.devices[i : i + 50] for i in range(0, len(self.devices), 50)]
        return self._map(self._use, chunks)

    def sync_due(self) -> TickStats:
        """Online devices check in and upload, those that are due."""
        now = time.monotonic()
        due = [
            d for d in self.devices if d.online and (now >= d.next_check_in or now >= d.next_upload)
        ]
        return self._map(self._sync, due, pool=self._network)

    def run(self, stop: threading.Event, tick_s: float) -> None:
        """Predict every ``tick_s`` seconds until ``stop`` is set; the network runs beside it."""
        network = threading.Thread(target=self._run_network, args=(stop,), name="fleet-network")
        network.start()
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except Exception as exc:  # the simulator's own bug: say so, keep the fleet going
                    print(f"-- fleet: a tick failed: {type(exc).__name__}: {exc}", flush=True)
                stop.wait(max(0.0, tick_s - (time.monotonic() - started)))
        finally:
            network.join()

    def _run_network(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sync_due()
            except Exception as exc:  # the simulator's own bug: say so, keep the fleet going
                print(f"-- fleet: a network round failed: {type(exc).__name__}: {exc}", flush=True)
            stop.wait(0.5)

    def set_online(self, device_ids: Iterable[str], online: bool) -> None:
        wanted = set(device_ids)
        for device in self.devices:
            if device.agent.device_id in wanted:
                device.online = online
                device.next_upload = device.next_check_in = 0.0

    def pick(self, share: float, seed: int) -> list[str]:
        """A seeded sample of ``share`` of the device ids."""
        rng = np.random.default_rng(seed)
        ids = [d.agent.device_id for d in self.devices]
        return sorted(rng.choice(ids, size=max(1, int(len(ids) * share)), replace=False).tolist())

    def active_versions(self, device_ids: Iterable[str] | None = None) -> Counter[str]:
        """How many devices run each version of the model (from each agent's own slots)."""
        wanted = None if device_ids is None else set(device_ids)
        found: Counter[str] = Counter()
        for device in self.devices:
            if wanted is not None and device.agent.device_id not in wanted:
                continue
            for installed in device.agent.installed_models():
                if installed.model == self.model:
                    found[installed.version or "none"] += 1
        return found

    def recent_errors(self) -> list[str]:
        return [f"{d.agent.device_id}: {e}" for d in self.devices for e in d.errors[-1:]][:5]
