"""Shadow runs on the device: the sampled calls' comparisons, drops when the queue is full,
candidate errors, the shadow slot, all counted into the active version's window."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel
from device_agent.shadow import ShadowRunner
from device_agent.slots import SlotStore
from device_agent.telemetry import Recorder
from tests.agent import onnx_models as m
from tests.agent.recording import DEVICE, HOUR, Clock, windows


def rotated_classifier() -> bytes:
    """The classifier with its classes rotated: it agrees with the original on no row whose
    top class is unique."""
    weights = np.zeros((4, 3), np.float32)
    weights[0, 1] = weights[1, 2] = weights[2, 0] = 1.0
    float_ = TensorProto.FLOAT
    return m._model(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        [helper.make_tensor_value_info("input", float_, [None, 4])],
        [helper.make_tensor_value_info("probabilities", float_, [None, 3])],
        [numpy_helper.from_array(weights, "W")],
    )


@pytest.fixture
def pair() -> tuple[LoadedModel, LoadedModel]:
    active = m.load(m.classifier(), m.classifier_manifest())
    candidate = m.load(rotated_classifier(), m.classifier_manifest(version="2.0.0"))
    return active, candidate


def test_only_sampled_calls_are_compared_and_the_caller_gets_the_active_answer(
    outbox: Outbox, pair: tuple[LoadedModel, LoadedModel]
) -> None:
    active, candidate = pair
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=16, clock=Clock())
    runner = ShadowRunner(recorder, queue_size=1000, seed=3)
    runner.attach(active, candidate, 0.4)
    rng = np.random.default_rng(2)
    # Some rows are ties on the first features' maximum, so agreement is neither 0 nor all.
    xs = rng.integers(0, 3, (300, 1, 4)).astype(np.float32)
    draw = random.Random(3).random
    expected_agreed = sampled = 0
    for x in xs:
        got = recorder.run(active, x, runner)
        want = active.run(x)["probabilities"]
        assert got["probabilities"].tobytes() == want.tobytes()
        if draw() < 0.4:
            sampled += 1
            theirs = candidate.run(x)["probabilities"]
            expected_agreed += int(np.argmax(want) == np.argmax(theirs))
    assert runner.drain()
    recorder.flush()
    [window] = windows(outbox)
    [entry] = window.shadow
    assert (entry.version, entry.bundle_sha256) == ("2.0.0", candidate.bundle_sha256)
    assert (entry.sampled, entry.compared, entry.dropped, entry.errors) == (sampled, sampled, 0, 0)
    assert entry.agreed == expected_agreed and 0 < expected_agreed < sampled
    assert entry.latency.count == sampled
    assert window.inference_count == 300  # the candidate's runs are not the window's calls
    runner.close()


def test_a_full_queue_drops_samples_and_counts_them(
    outbox: Outbox, pair: tuple[LoadedModel, LoadedModel]
) -> None:
    active, candidate = pair
    release = threading.Event()
    run = candidate.run_feed

    def held(feed: dict[str, Any], options: None) -> list[Any]:
        release.wait(30)
        return run(feed, options)

    candidate.run_feed = held  # the candidate is slow: the queue fills behind it
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=16, clock=Clock())
    runner = ShadowRunner(recorder, queue_size=1, seed=1)
    runner.attach(active, candidate, 1.0)
    x = np.zeros((1, 4), np.float32)
    for _ in range(50):
        recorder.run(active, x, runner)
    release.set()
    assert runner.drain()
    recorder.flush()
    [entry] = windows(outbox)[0].shadow
    assert entry.sampled == 50
    assert entry.dropped + entry.compared == 50 and entry.dropped >= 48
    runner.close()


def test_candidate_failures_are_counted_as_errors(
    outbox: Outbox, pair: tuple[LoadedModel, LoadedModel]
) -> None:
    active, candidate = pair

    def broken(feed: dict[str, Any], options: None) -> list[Any]:
        raise RuntimeError("onnxruntime: bad candidate")

    candidate.run_feed = broken
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=16, clock=Clock())
    runner = ShadowRunner(recorder, queue_size=10, seed=1)
    runner.attach(active, candidate, 1.0)
    for _ in range(5):
        recorder.run(active, np.ones((1, 4), np.float32), runner)
    assert runner.drain()
    recorder.flush()
    [entry] = windows(outbox)[0].shadow
    assert (entry.sampled, entry.errors, entry.compared, entry.latency.count) == (5, 5, 0, 0)
    runner.close()


def test_the_shadow_slot_sits_beside_the_ab_slots(tmp_path: Path) -> None:
    slots = SlotStore(tmp_path)
    data = b"bundle bytes"
    info = slots.install_shadow(
        "gesture", data, version="2.0.0", bundle_sha256="ab" * 32, sample_fraction=0.1
    )
    assert info.path.read_bytes() == data and slots.shadow("gesture") == info
    assert slots.record("gesture").slots == {}  # a and b untouched
    info.path.write_bytes(b"cut")  # a torn bundle is no candidate
    assert slots.shadow("gesture") is None
    assert slots.clear_shadow("gesture") and slots.shadow("gesture") is None
