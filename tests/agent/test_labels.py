"""Late labels: counted in the window of the prediction's time and for the version that made it,
not the current ones; the versions a device ran survive restarts; bad labels are refused."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.errors import InputError, OutboxError
from device_agent.local_api import LocalApi
from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel
from device_agent.telemetry import Recorder, parse_prediction_time
from firmware_bundles.messages import TelemetryWindow
from tests.agent import onnx_models as m
from tests.agent.conftest import MODEL, PROBE, AgentFactory, Bundles, assert_answers
from tests.agent.recording import DEVICE, HOUR, T0, Clock, windows
from tests.agent.simulator import FleetSimulator

DAY = 86400


@pytest.fixture(scope="module")
def v1(classifier: LoadedModel) -> LoadedModel:
    return classifier


@pytest.fixture(scope="module")
def v2() -> LoadedModel:
    return m.load(m.classifier(), m.classifier_manifest(version="1.1.0"))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _sent(outbox: Outbox) -> list[TelemetryWindow]:
    """Every closed window, taken into batches as an upload would."""
    found = []
    while (batch := outbox.next_batch(100)) is not None:
        found.extend(batch.windows)
        outbox.acknowledge(batch)
    return found


def test_a_label_7_days_late_counts_for_the_version_and_window_that_predicted(
    outbox: Outbox, v1: LoadedModel, v2: LoadedModel
) -> None:
    clock = Clock(T0 + 600)
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=4, clock=clock)
    x = np.zeros((1, 4), np.float32)
    predicted = m.CLASSES[int(np.argmax(recorder.run(v1, x)["probabilities"]))]
    predicted_at = _utc(clock.now)
    recorder.close_due_windows(T0 + HOUR)
    first = _sent(outbox)  # the prediction's window went up long ago
    assert [(w.version, w.inference_count) for w in first] == [("1.0.0", 1)]

    clock.now = T0 + 7 * DAY  # a week later the device runs 1.1.0
    recorder.run(v2, x)
    recorder.label_prediction("gesture", "1.0.0", predicted_at, "walk", predicted=predicted)
    recorder.close_due_windows(include_open=True)
    later = {(w.version, w.window_start.timestamp()): w for w in _sent(outbox)}

    assert set(later) == {("1.0.0", T0), ("1.1.0", T0 + 7 * DAY)}
    late = later[("1.0.0", T0)]  # a new piece of the prediction's window, only the label
    assert late.bundle_sha256 == v1.bundle_sha256
    assert late.labels == {predicted: {"walk": 1}}
    assert late.inference_count == 0 and late.latency.count == 0
    assert later[("1.1.0", T0 + 7 * DAY)].labels == {}


def test_the_old_form_counts_in_the_current_window_of_the_active_version(
    outbox: Outbox, v1: LoadedModel, v2: LoadedModel
) -> None:
    clock = Clock(T0 + 600)
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, clock=clock)
    recorder.run(v1, np.zeros((1, 4), np.float32))
    clock.now = T0 + 3 * HOUR
    recorder.label(v2, "walk", predicted="rest")
    recorder.flush()
    [label_window] = [w for w in windows(outbox) if w.labels]
    assert (label_window.version, label_window.window_start.timestamp()) == ("1.1.0", T0 + 3 * HOUR)


def test_a_version_this_device_never_ran_is_refused(outbox: Outbox, v1: LoadedModel) -> None:
    clock = Clock(T0)
    recorder = Recorder(outbox, DEVICE, clock=clock)
    with pytest.raises(InputError, match="this device ran \\(none yet\\)"):
        recorder.label_prediction("gesture", "1.0.0", _utc(T0), "walk")
    recorder.run(v1, np.zeros((1, 4), np.float32))
    with pytest.raises(InputError) as caught:
        recorder.label_prediction("gesture", "9.9.9", _utc(T0), "walk")
    assert caught.value.input == "version"
    assert "a version of gesture this device ran (1.0.0), got '9.9.9'" in str(caught.value)
    with pytest.raises(InputError, match="ran \\(none yet\\)"):
        recorder.label_prediction("other-model", "1.0.0", _utc(T0), "walk")
    recorder.flush()
    assert all(not w.labels for w in windows(outbox))


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("yesterday", "'yesterday'"),
        ("2026-05-01T12:00:00", "'2026-05-01T12:00:00'"),  # no offset: whose local time?
        ("2026-05-01", "'2026-05-01'"),
        (1_780_000_000, "1780000000"),  # epoch numbers are refused, not guessed at
        (1_780_000_000.5, "1780000000.5"),
        (True, "True"),
        ("", "''"),
        (datetime(2026, 5, 1, 12), "datetime.datetime(2026, 5, 1, 12, 0)"),
    ],
    ids=["words", "no-offset", "date-only", "epoch-int", "epoch-float", "bool", "empty", "naive"],
)
def test_a_malformed_prediction_time_is_refused(value: Any, got: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_prediction_time("gesture", value)
    assert caught.value.input == "predicted_at"
    assert caught.value.got == got
    assert "ISO 8601 time with its UTC offset" in str(caught.value)


def test_prediction_times_with_an_offset_are_taken_in_utc() -> None:
    parsed = parse_prediction_time("gesture", "2026-05-01T14:00:00+02:00")
    assert parsed == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert parse_prediction_time("gesture", "2026-05-01T12:00:00Z") == parsed


@pytest.mark.parametrize(
    ("offset_s", "message"),
    [
        (301.0, "no later than the device's clock (2026-05-28T20:00:00Z) plus 300 s"),
        (-30 * DAY - 1, "within 30 days before the device's clock (2026-05-28T20:00:00Z)"),
    ],
    ids=["future-beyond-skew", "older-than-max-age"],
)
def test_a_prediction_time_out_of_range_is_refused(
    outbox: Outbox, v1: LoadedModel, offset_s: float, message: str
) -> None:
    recorder = Recorder(outbox, DEVICE, clock=Clock(T0))
    recorder.run(v1, np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match=re.escape(message)):
        recorder.label_prediction("gesture", "1.0.0", _utc(T0 + offset_s), "walk")
    # Inside the range (the skew and the age limit themselves) is accepted.
    recorder.label_prediction("gesture", "1.0.0", _utc(T0 + 300), "walk")
    recorder.label_prediction("gesture", "1.0.0", _utc(T0 - 30 * DAY), "walk")
    recorder.flush()
    assert sum(sum(c.values()) for w in windows(outbox) for c in w.labels.values()) == 2


def test_labels_of_a_past_version_are_checked_against_that_versions_classes(
    outbox: Outbox, v1: LoadedModel
) -> None:
    recorder = Recorder(outbox, DEVICE, clock=Clock(T0))
    recorder.run(v1, np.zeros((1, 4), np.float32))
    for field, call in (
        ("label", lambda: recorder.label_prediction("gesture", "1.0.0", _utc(T0), "jump")),
        (
            "predicted",
            lambda: recorder.label_prediction("gesture", "1.0.0", _utc(T0), "walk", "jump"),
        ),
        ("label", lambda: recorder.label_prediction("gesture", "1.0.0", _utc(T0), "a b")),
    ):
        with pytest.raises(InputError) as caught:
            call()
        assert caught.value.input == field


def test_a_restart_keeps_the_versions_the_device_ran(
    tmp_path: Path, v1: LoadedModel, v2: LoadedModel
) -> None:
    path = tmp_path / "outbox.sqlite"
    first = Outbox(path, 1 << 20)
    recorder = Recorder(first, DEVICE, window_s=HOUR, clock=Clock(T0 + 10))
    recorder.run(v1, np.zeros((1, 4), np.float32))
    recorder.run(v2, np.zeros((1, 4), np.float32))
    recorder.close()
    first.close()

    again = Outbox(path, 1 << 20)  # a new process: nothing of 1.0.0 is loaded now
    try:
        restarted = Recorder(again, DEVICE, window_s=HOUR, clock=Clock(T0 + 2 * DAY))
        assert {v: r.bundle_sha256 for v, r in again.ran_versions("gesture").items()} == {
            "1.0.0": v1.bundle_sha256,
            "1.1.0": v2.bundle_sha256,
        }
        restarted.label_prediction("gesture", "1.0.0", _utc(T0 + 10), "run", predicted="rest")
        restarted.flush()
        labelled = [w for w in windows(again) if w.labels]
        assert [(w.version, w.bundle_sha256, w.labels) for w in labelled] == [
            ("1.0.0", v1.bundle_sha256, {"rest": {"run": 1}})
        ]
        assert labelled[0].window_start.timestamp() == T0
    finally:
        again.close()


def test_predictions_go_on_when_the_version_cannot_be_remembered(
    outbox: Outbox, v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(ran: Any) -> None:
        raise OutboxError("database or disk is full")

    monkeypatch.setattr(outbox, "remember_version", full_disk)
    recorder = Recorder(outbox, DEVICE, clock=Clock(T0))
    recorder.run(v1, np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match="ran \\(none yet\\)"):
        recorder.label_prediction("gesture", "1.0.0", _utc(T0), "walk")
    recorder.flush()
    assert [w.inference_count for w in windows(outbox)] == [1]


# -- through the agent facade and the local API -----------------------------------------------


def test_agent_counts_a_week_late_label_for_the_version_that_predicted(
    installed: Agent, make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> None:
    assert_answers(installed, bundles.v1)
    predicted_at = sim.clock.now
    sim.clock.advance(HOUR)
    installed.upload_telemetry()
    sim.clock.advance(7 * DAY - HOUR)  # a week later: 2.0.0 is released and installed
    sim.assign(MODEL, bundles.v2.data)
    assert [r.action for r in installed.check_in().installs] == ["installed"]
    assert_answers(installed, bundles.v2)
    installed.label(
        MODEL, "tap", predicted="rest", predicted_at=predicted_at.isoformat(), version="1.0.0"
    )
    installed.close()

    restarted = make_agent()  # and once more after a restart, as a datetime
    restarted.label(MODEL, "swipe", predicted_at=predicted_at, version="1.0.0")
    restarted.label(MODEL, "rest")  # the old form: the active version, now
    sim.clock.advance(HOUR)
    restarted.upload_telemetry()

    windows_sent = [w for batch in sim.telemetry for w in batch.windows]
    labels: dict[tuple[str, datetime], dict[str, dict[str, int]]] = {}
    for w in windows_sent:
        for predicted, counts in w.labels.items():
            into = labels.setdefault((w.version, w.window_start), {}).setdefault(predicted, {})
            for label, n in counts.items():
                into[label] = into.get(label, 0) + n
    v1_start = datetime.fromtimestamp(predicted_at.timestamp() // HOUR * HOUR, UTC)
    assert labels.pop(("1.0.0", v1_start)) == {"rest": {"tap": 1}, "unknown": {"swipe": 1}}
    assert [(version, counts) for (version, _), counts in labels.items()] == [
        ("2.0.0", {"unknown": {"rest": 1}})
    ]
    v1_windows = [w for w in windows_sent if w.version == "1.0.0"]
    assert {w.bundle_sha256 for w in v1_windows} == {bundles.v1.bundle_sha256}


@pytest.mark.parametrize(
    ("fields", "input_name", "message"),
    [
        ({"predicted_at": "2026-06-01T00:00:00Z"}, "version", "predicted_at and version together"),
        ({"version": "1.0.0"}, "predicted_at", "predicted_at and version together"),
        ({"predicted_at": "2026-06-01 noon", "version": "1.0.0"}, "predicted_at", "ISO 8601"),
        ({"predicted_at": "2026-06-01T00:00:00Z", "version": "0.9.0"}, "version", "ran (1.0.0)"),
    ],
    ids=["no-version", "no-time", "bad-time", "never-ran"],
)
def test_agent_refuses_half_a_prediction_reference(
    installed: Agent, fields: dict[str, str], input_name: str, message: str
) -> None:
    installed.predict(MODEL, PROBE)
    with pytest.raises(InputError) as caught:
        installed.label(MODEL, "tap", **fields)
    assert caught.value.input == input_name
    assert message in str(caught.value)


class _Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def label(self, model: str, label: Any, predicted: Any = None, **kw: Any) -> None:
        self.calls.append((model, label, predicted, kw))


@pytest.mark.parametrize(
    ("request_line", "message"),
    [
        ({"predicted_at": 1780000000, "version": "1.0.0"}, "'predicted_at' must be str or null"),
        ({"predicted_at": "2026-06-01T00:00:00Z", "version": 1}, "'version' must be str or null"),
    ],
    ids=["time-not-text", "version-not-text"],
)
def test_local_api_names_mistyped_label_fields(request_line: dict[str, Any], message: str) -> None:
    agent = _Recording()
    api = LocalApi(agent)  # type: ignore[arg-type]
    line = json.dumps({"op": "label", "model": MODEL, "label": "tap", **request_line}).encode()
    answer = json.loads(api.handle_line(line))
    assert answer == {"ok": False, "error": {"type": "BadRequest", "message": f"field {message}"}}
    assert agent.calls == []
    ok = {"op": "label", "model": MODEL, "label": "tap", "version": "1.0.0", "predicted_at": "x"}
    assert json.loads(api.handle_line(json.dumps(ok).encode()))["ok"] is True
    assert agent.calls == [(MODEL, "tap", None, {"predicted_at": "x", "version": "1.0.0"})]
