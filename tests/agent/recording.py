"""Helpers for the telemetry and outbox tests: an event clock, windows read back from the outbox
file, a burst of predictions with its totals, and the server's rollups."""

from __future__ import annotations

import sqlite3
from typing import Any

import numpy as np
import pytest

from device_agent.errors import InputError
from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel
from device_agent.telemetry import Recorder
from firmware_bundles.messages import TelemetryWindow
from tests.server.conftest import Fleet

HOUR = 3600
T0 = 1_780_000_000.0 - (1_780_000_000 % HOUR)  # an hour boundary in 2026
DEVICE = "phone-1"


class Clock:
    """Event time for the recorder, set by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def windows(outbox: Outbox, device_id: str = DEVICE) -> list[TelemetryWindow]:
    """Every window in the outbox, open or closed (read from the file, as a restart would)."""
    db = sqlite3.connect(outbox.path)
    rows = db.execute("SELECT body FROM windows WHERE device_id = ? ORDER BY id", (device_id,))
    found = [TelemetryWindow.from_bytes(bytes(r[0])) for r in rows]
    db.close()
    return found


def record_burst(recorder: Recorder, model: LoadedModel, n: int) -> dict[str, Any]:
    """Make ``n`` predictions and two bad calls; the totals a server must end up with."""
    rng = np.random.default_rng(n)
    classes = [0, 0, 0, 0]
    for x in rng.normal(0, 1, (n, 1, 4)).astype(np.float32):
        classes[int(np.argmax(recorder.run(model, x)["probabilities"]))] += 1
    for _ in range(2):
        with pytest.raises(InputError):
            recorder.run(model, np.zeros((1, 3), np.float32))
    recorder.feedback(model, "thumbs_up")
    return {"inference_count": n + 2, "error_count": 2, "outputs": {"probabilities": classes}}


def rollups(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    r = fleet.client.get(
        f"/v1/telemetry/rollups?model={model}", headers=fleet.auth(fleet.token("viewer"))
    )
    assert r.status_code == 200, r.text
    rollups: list[dict[str, Any]] = r.json()
    return rollups
