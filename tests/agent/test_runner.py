"""The runner's schedule: jittered intervals, doubling backoff with a cap while the server is
unreachable, ``check-in-now`` cutting a wait short, and a clean stop. A real Agent against a port
nobody listens on (the agent is offline), in this process so the test reads the event log."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.agent import Agent
from device_agent.config import AgentSettings
from device_agent.runner import EXIT_OK, Runner
from tests.conftest import Keys
from tests.procs import free_port, wait_for


def settings(tmp_path: Path, keys: Keys, **overrides: Any) -> AgentSettings:
    _, envelope = keys.make_root()
    root = tmp_path / "root.json"
    root.write_bytes(envelope.to_bytes())
    values: dict[str, Any] = {
        "server_url": f"http://127.0.0.1:{free_port()}",  # nothing listens: offline
        "state_dir": tmp_path / "state",
        "root_path": root,
        "hardware_id": "phone-android",
        "enroll_token": "eft_unused",
        "check_in_jitter": 0.0,
        "backoff_initial_s": 1.0,
        "backoff_max_s": 8.0,
        **overrides,
    }
    return AgentSettings(**values)


class Events:
    """The runner's log, kept in memory."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.lines.append({"event": event, **fields})

    def of(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines if line["event"] == event]


@pytest.fixture()
def agent(tmp_path: Path, keys: Keys) -> Iterator[Agent]:
    agent = Agent(settings(tmp_path, keys))
    yield agent
    agent.close()


def test_backoff_doubles_up_to_the_cap(agent: Agent) -> None:
    runner = Runner(agent.settings, agent, log=Events())
    assert [runner.backoff_s(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert runner.backoff_s(10_000) == 8.0  # no overflow after a long outage


def test_waits_are_jittered_within_the_configured_spread(
    tmp_path: Path, keys: Keys, agent: Agent
) -> None:
    jittered = settings(tmp_path, keys, check_in_jitter=0.2, check_in_interval_s=100.0)
    runner = Runner(jittered, agent, log=Events(), rng=random.Random(7))
    intervals = [runner.interval_s() for _ in range(200)]
    assert all(80.0 <= s <= 120.0 for s in intervals)
    assert len(set(intervals)) > 100  # spread, so a fleet does not check in in lockstep
    delays = [runner.backoff_s(3) for _ in range(200)]
    assert all(3.2 <= s <= 4.8 for s in delays)
    assert all(runner.backoff_s(50) <= 8.0 for _ in range(50))


def test_offline_rounds_back_off_and_check_in_now_cuts_the_wait(tmp_path: Path, keys: Keys) -> None:
    # Backoff long enough that only check-in-now can start the next round within the test.
    offline = settings(tmp_path, keys, backoff_initial_s=3600.0, backoff_max_s=7200.0)
    agent = Agent(offline)
    events = Events()
    runner = Runner(offline, agent, log=events)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.serve()))
    thread.start()
    try:
        first = wait_for(lambda: events.of("backoff"), "the first backoff")[0]
        assert first["step"] == "enroll" and first["attempt"] == 1 and first["delay_s"] == 3600
        assert "Connection refused" in first["reason"] or "ConnectError" in first["reason"]
        runner.check_in_now()
        second = wait_for(lambda: events.of("backoff")[1:], "a second round")[0]
        assert second["attempt"] == 2 and second["delay_s"] == 7200
    finally:
        runner.stop()
        thread.join(timeout=60)
    assert codes == [EXIT_OK]
    assert [e["event"] for e in events.lines][-2:] == ["stopping", "stopped"]
