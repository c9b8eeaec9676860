"""The emulated ring counts a late label in the window of its prediction's time and version, so
the window pieces the phone relays carry it there, after the ring switched versions."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from firmware_bundles.messages import TelemetryWindow
from hil.device_telemetry import DeviceTelemetry
from tests.agent import onnx_models as m

HOUR = 3600
START = datetime(2026, 6, 1, 9, 0, 0, tzinfo=UTC)
V1_SHA, V2_SHA = "1" * 64, "2" * 64


class RingClock:
    def __init__(self) -> None:
        self.now = START + timedelta(minutes=10)

    def __call__(self) -> datetime:
        return self.now


def _predict(ring: DeviceTelemetry, version: str, bundle_sha256: str) -> None:
    manifest = m.classifier_manifest(version=version)
    x = np.zeros((1, 4), np.float32)
    ring.record(
        manifest, bundle_sha256, {"input": x}, {"probabilities": np.array([[0.7, 0.2, 0.1]])}, 0.01
    )


def _relayed(ring: DeviceTelemetry) -> list[TelemetryWindow]:
    """What a telemetry read hands the phone, as the phone parses it; then acknowledged."""
    ring.seal()
    pieces, _ = ring.read(None, 1 << 20)
    if pieces:
        ring.acknowledge(pieces[-1].seq)
    return [TelemetryWindow.from_dict(p.window) for p in pieces]


def test_a_late_label_on_the_ring_goes_to_the_version_and_window_that_predicted() -> None:
    clock = RingClock()
    ring = DeviceTelemetry("ring-1", HOUR, clock)
    _predict(ring, "1.0.0", V1_SHA)
    predicted_at = clock.now
    assert [(w.version, w.inference_count) for w in _relayed(ring)] == [("1.0.0", 1)]

    clock.now += timedelta(days=7)  # a week later the ring runs 2.0.0
    _predict(ring, "2.0.0", V2_SHA)
    ring.record_label("gesture", "1.0.0", predicted_at, "walk", predicted="rest")
    late = {(w.version, w.window_start): w for w in _relayed(ring)}

    assert set(late) == {("1.0.0", START), ("2.0.0", START + timedelta(days=7))}
    piece = late[("1.0.0", START)]
    assert piece.bundle_sha256 == V1_SHA and piece.inference_count == 0
    assert piece.labels == {"rest": {"walk": 1}}
    assert late[("2.0.0", START + timedelta(days=7))].labels == {}


@pytest.mark.parametrize(
    ("version", "when", "label", "message"),
    [
        ("3.0.0", timedelta(0), "walk", "version '3.0.0' is not one this device ran (1.0.0)"),
        ("1.0.0", timedelta(minutes=6), "walk", "no later than the device's clock"),
        ("1.0.0", -timedelta(days=31), "walk", "within 30 days before the device's clock"),
        ("1.0.0", timedelta(0), "jump", "classes ['rest', 'run', 'walk'], got 'jump'"),
        ("1.0.0", timedelta(0), "a b", "'label' expected a name of 1-64 letters"),
    ],
    ids=["never-ran", "future", "too-old", "not-a-class", "not-a-name"],
)
def test_the_ring_refuses_labels_it_cannot_place(
    version: str, when: timedelta, label: str, message: str
) -> None:
    clock = RingClock()
    ring = DeviceTelemetry("ring-1", HOUR, clock)
    _predict(ring, "1.0.0", V1_SHA)
    with pytest.raises(ValueError, match=re.escape(message)):
        ring.record_label("gesture", version, clock.now + when, label)
    assert all(not w.labels for w in _relayed(ring))
