"""Telemetry: counts, histograms and event-time windows exactly as the model answered."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from converters.reference import counts_on_edges
from device_agent import histograms
from device_agent.errors import InputError
from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel
from device_agent.telemetry import Recorder
from firmware_bundles import telemetry as sketch
from firmware_bundles.manifest import Histogram
from tests.agent import onnx_models as m
from tests.agent.recording import DEVICE, HOUR, T0, Clock, windows


def test_counts_equal_the_predictions_exactly(outbox: Outbox, classifier: LoadedModel) -> None:
    clock = Clock()
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=64, clock=clock)
    rng = np.random.default_rng(1)
    xs = rng.normal(0, 1, (1000, 1, 4)).astype(np.float32)
    classes = np.zeros(3, np.int64)
    for x in xs:
        out = recorder.run(classifier, x)
        classes[int(np.argmax(out["probabilities"]))] += 1
    for bad in (np.zeros((1, 5), np.float32), [[1.0, 2.0]], np.zeros((1, 4), np.float64)):
        with pytest.raises(InputError):
            recorder.run(classifier, bad)
    recorder.run(classifier, np.repeat(xs[0], 7, axis=0))  # one call, seven rows
    classes[int(np.argmax(xs[0][0, :3]))] += 7
    assert recorder.stats()["buffered_inferences"] > 0  # 1000 is not a multiple of 64
    recorder.flush()
    assert recorder.stats()["buffered_inferences"] == 0
    [window] = windows(outbox)
    assert window.inference_count == 1004
    assert window.error_count == 3
    assert window.latency.count == 1001
    assert sum(window.latency.bins.values()) + window.latency.zero_count == 1001
    assert window.model == "gesture" and window.version == "1.0.0"
    assert window.bundle_sha256 == classifier.bundle_sha256
    [probabilities] = window.outputs
    assert probabilities.name == "probabilities"
    assert probabilities.counts == [*classes.tolist(), 0]
    # Every row of every feature landed in exactly one bin.
    assert [h.name for h in window.inputs] == ["f0", "f1", "f2", "f3"]
    for h, column in zip(window.inputs, range(4), strict=True):
        values = np.concatenate([xs[:, 0, column], np.repeat(xs[0, 0, column], 7)])
        assert h.counts == counts_on_edges(values, [-1.0, 0.0, 1.0])


def test_histograms_land_in_the_bins_the_manifest_defines(outbox: Outbox) -> None:
    # Edges that are not float32 numbers: float32(0.1) is just above 0.1 and the float32 below
    # it just under; float32(0.7) is just under 0.7. Each side must be told apart exactly.
    below_tenth = float(np.nextafter(np.float32(0.1), np.float32(0)))
    manifest = m.classifier_manifest(
        input_histograms=[
            m.numeric("f0", [-1.0, 0.0, 1.0]),
            m.numeric("f1", [0.1, 0.7]),
            m.numeric("input", [0.0]),  # the whole tensor, by the input's name
            m.numeric("f9", [0.0]),  # names nothing: reported, not counted
        ]
    )
    model = m.load(m.classifier(), manifest)
    recorder = Recorder(outbox, DEVICE, flush_every=4, clock=Clock())
    rows = [
        [-2.0, 0.1, 5.0, 0.0],  # f0 under; f1 = float32(0.1) >= 0.1: bin [0.1, 0.7)
        [-1.0, below_tenth, 0.0, 0.0],  # f0 on the first edge: bin [-1, 0); f1 under
        [0.0, 0.7, -3.0, 0.0],  # f0 bin [0, 1); f1 = float32(0.7) < 0.7: bin [0.1, 0.7)
        [1.0, math.nan, 0.0, 0.0],  # f0 on the last edge: overflow; f1 NaN: missing, no bin
        [0.5, 1.0, 0.0, 9.0],  # f0 bin [0, 1); f1 overflow
    ]
    classes = [0, 0, 0, 0]
    for row in rows:
        out = recorder.run(model, np.array([row], np.float32))
        classes[int(np.argmax(out["probabilities"]))] += 1
    recorder.flush()
    [window] = windows(outbox)
    counts = {h.name: h.counts for h in window.inputs}
    assert counts["f0"] == [1, 1, 2, 1]
    assert counts["f1"] == [1, 2, 1]
    assert float(np.float32(0.7)) < 0.7 < 1.0 and float(np.float32(0.1)) > 0.1  # as the rows say
    assert counts["input"] == [3, 16]  # 20 values: -2, -1 and -3 under 0, NaN in no bin
    # NaN is missing, counted apart from overflow, for the feature and the whole tensor.
    assert window.quality.missing == {"f1": 1, "input": 1}
    assert "f9" not in counts
    assert recorder.stats()["unmatched_histograms"] == {"gesture": ["f9"]}
    assert classes == [1, 3, 1, 0]  # rows: 2, 1, 1, all NaN (argmax takes the first), 1
    assert [h.counts for h in window.outputs] == [classes]


def test_channel_histograms_and_regression_bins(outbox: Outbox) -> None:
    manifest = m.manifest(
        m.channels(),
        inputs=[{"name": "window", "dtype": "float32", "shape": [None, 2, 8]}],
        outputs=[{"name": "prediction", "dtype": "float32", "shape": [None, 1]}],
        input_histograms=[m.numeric("channel_0", [0.0, 1.0]), m.numeric("channel_1", [0.0])],
        output_histograms=[m.numeric("prediction", [0.25, 0.75])],
        task="regression",
    )
    model = m.load(m.channels(), manifest)
    recorder = Recorder(outbox, DEVICE, flush_every=3, clock=Clock())
    window_a = np.zeros((1, 2, 8), np.float32)
    window_a[0, 0, :4] = 2.0  # channel 0: 4 overflow, 4 in [0, 1); channel 1: 8 at or above 0
    window_b = np.full((1, 2, 8), -1.0, np.float32)  # everything under; mean -1
    for window in (window_a, window_b, window_a, window_a):
        recorder.run(model, window)
    recorder.run(model, np.concatenate([window_b, window_b]))  # a batch of two windows
    recorder.flush()
    [stored] = windows(outbox)
    counts = {h.name: h.counts for h in stored.inputs}
    assert counts["channel_0"] == [24, 12, 12]
    assert counts["channel_1"] == [24, 24]
    # Means: window_a 0.5 (three times), window_b -1 (three rows).
    assert [h.counts for h in stored.outputs] == [[3, 3, 0]]
    assert stored.inference_count == 5


def test_label_outputs_count_by_category(outbox: Outbox) -> None:
    manifest = m.manifest(
        m.labeller(),
        inputs=[{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        outputs=[{"name": "label", "dtype": "int64", "shape": [None], "class_labels": [0, 1]}],
        output_histograms=[m.categorical("label", [0, 1])],
    )
    model = m.load(m.labeller(), manifest)
    recorder = Recorder(outbox, DEVICE, clock=Clock())
    for row in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [3, 0, 0, 0]):
        recorder.run(model, np.array([row], np.float32))
    recorder.flush()
    [window] = windows(outbox)
    assert [h.counts for h in window.outputs] == [[2, 1, 2]]  # class 2 is not a category


def test_full_buffers_are_written_at_most_once_per_persist_interval(
    outbox: Outbox, classifier: LoadedModel
) -> None:
    ticks = Clock(100.0)  # the monotonic clock
    recorder = Recorder(
        outbox, DEVICE, flush_every=4, clock=Clock(), persist_every_s=5.0, monotonic=ticks
    )
    x = np.zeros((1, 4), np.float32)

    def stored() -> int:
        return sum(w.inference_count for w in windows(outbox))

    for _ in range(8):  # two full buffers, aggregated, not yet written
        recorder.run(classifier, x)
    assert stored() == 0
    assert recorder.stats()["unsaved_windows"] == 1
    ticks.now = 105.0
    for _ in range(4):  # the next full buffer after the interval writes everything
        recorder.run(classifier, x)
    assert stored() == 12
    for _ in range(5):
        recorder.run(classifier, x)
    assert stored() == 12
    recorder.flush()  # an explicit flush always writes
    assert stored() == 17
    assert recorder.stats()["unsaved_windows"] == 0


def test_buffers_of_a_version_no_longer_called_are_released(
    outbox: Outbox, classifier: LoadedModel
) -> None:
    recorder = Recorder(outbox, DEVICE, flush_every=8, clock=Clock())
    other = m.load(m.classifier(), m.classifier_manifest(version="1.1.0"))
    x = np.zeros((1, 4), np.float32)
    recorder.run(classifier, x)
    recorder.run(other, x)
    assert recorder.stats()["models_buffered"] == 2
    recorder.flush()
    recorder.run(other, x)
    recorder.flush()
    assert recorder.stats()["models_buffered"] == 2  # one idle flush is not enough
    recorder.run(other, x)
    recorder.flush()
    assert recorder.stats()["models_buffered"] == 1
    original = other.check

    def racing_check(inputs: Any) -> Any:
        recorder.flush()  # another thread's flushes release this call's tape meanwhile
        recorder.flush()
        return original(inputs)

    other.check = racing_check  # type: ignore[method-assign]
    recorder.run(other, x)  # still counted: the released tape is taken back
    other.check = original  # type: ignore[method-assign]
    assert recorder.stats()["models_buffered"] == 1
    recorder.run(classifier, x)  # comes back: counted as before
    recorder.flush()
    counts = {w.version: w.inference_count for w in windows(outbox)}
    assert counts == {"1.0.0": 2, "1.1.0": 4}


def test_windows_split_by_event_time(outbox: Outbox, classifier: LoadedModel) -> None:
    clock = Clock()
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=1000, clock=clock)
    x = np.zeros((1, 4), np.float32)
    plan = [(T0 + 0.0, 3), (T0 + HOUR - 0.001, 2), (T0 + HOUR, 4), (T0 + 5 * HOUR + 17, 1)]
    for when, count in plan:
        clock.now = when
        for _ in range(count):
            recorder.run(classifier, x)
    clock.now = T0 + 2 * HOUR
    with pytest.raises(InputError):
        recorder.run(classifier, [[0.0]])
    recorder.feedback(classifier, "thumbs_down")
    recorder.label(classifier, "walk", predicted="rest")
    recorder.label(classifier, "run")
    recorder.selftest_failure("gesture", "1.1.0", "e" * 64)
    recorder.flush()  # one buffer spanning three windows
    found = {(w.version, int(w.window_start.timestamp() - T0) // HOUR): w for w in windows(outbox)}
    assert {k: w.inference_count for k, w in found.items()} == {
        ("1.0.0", 0): 5,
        ("1.0.0", 1): 4,
        ("1.0.0", 2): 1,
        ("1.0.0", 5): 1,
        ("1.1.0", 2): 0,
    }
    third = found[("1.0.0", 2)]
    assert third.error_count == 1 and third.latency.count == 0
    assert third.feedback == {"thumbs_down": 1}
    assert third.labels == {"rest": {"walk": 1}, "unknown": {"run": 1}}
    assert found[("1.1.0", 2)].selftest_failure_count == 1
    assert all(w.window_s == HOUR for w in found.values())


def test_closed_windows_wait_for_upload_and_late_data_starts_a_new_one(
    outbox: Outbox, classifier: LoadedModel
) -> None:
    clock = Clock(T0 + 10)
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=2, clock=clock)
    x = np.zeros((1, 4), np.float32)
    recorder.run(classifier, x)
    assert recorder.close_due_windows(T0 + HOUR - 1) == 0  # the hour is not over
    assert recorder.close_due_windows(T0 + HOUR) == 1
    assert outbox.stats()["closed_windows"] == 1
    recorder.run(classifier, x)  # same event-time hour, arriving after it closed
    recorder.run(classifier, x)
    assert recorder.close_due_windows(T0 + HOUR, include_open=True) == 1
    batch = outbox.next_batch(10)
    assert batch is not None
    assert [w.inference_count for w in batch.windows] == [1, 2]
    assert {w.window_start.timestamp() for w in batch.windows} == {T0}


@pytest.mark.parametrize(
    ("kind", "call"),
    [
        ("kind", lambda r, model: r.feedback(model, "")),
        ("kind", lambda r, model: r.feedback(model, "x" * 65)),
        ("label", lambda r, model: r.label(model, "two words")),
        ("predicted", lambda r, model: r.label(model, "walk", predicted="a/b")),
    ],
    ids=["empty-kind", "long-kind", "label-with-space", "predicted-with-slash"],
)
def test_feedback_and_label_names_are_checked(
    outbox: Outbox, classifier: LoadedModel, kind: str, call: Any
) -> None:
    recorder = Recorder(outbox, DEVICE, clock=Clock())
    with pytest.raises(InputError) as caught:
        call(recorder, classifier)
    assert caught.value.input == kind
    assert windows(outbox) == []


def test_latency_sketch_matches_the_shared_one_bucket_for_bucket() -> None:
    gamma = 1.01 / 0.99
    boundaries = [gamma**k for k in range(-1000, -300, 7)]  # on bucket edges, where logs round
    values = np.array(
        [*boundaries, *np.random.default_rng(5).lognormal(-10, 1.5, 2000), 0.0, 5e-10],
        np.float64,
    )
    mine = histograms.latency_sketch(values, 0.01)
    reference = sketch.new_sketch(0.01)
    for v in values.tolist():
        sketch.add(reference, v)
    assert mine["bins"] == reference["bins"]
    assert mine["zero_count"] == reference["zero_count"] == 2
    assert (mine["count"], mine["min"], mine["max"]) == (
        reference["count"],
        reference["min"],
        reference["max"],
    )
    assert math.isclose(mine["sum"], reference["sum"], rel_tol=1e-12)


def test_numeric_counts_equal_the_converters_reference_counts() -> None:
    rng = np.random.default_rng(9)
    values = rng.normal(0, 1, 5000).astype(np.float32)
    # Values exactly at the float32 nearest each edge: -0.3 and 0.7 round down, 0.3 and 1.1 up.
    edges = [-1.7, -0.3, 0.3, 0.30000001, 0.7, 1.1]
    for i, edge in enumerate(edges):
        values[i * 40 : (i + 1) * 40] = np.float32(edge)
    bins = histograms.Bins("numeric", tuple(edges), (), histograms._float32_edges(tuple(edges)))
    assert histograms.count_numeric(values, bins).tolist() == counts_on_edges(values, edges)
    ints = rng.integers(-5, 5, 300)
    assert histograms.count_numeric(ints, bins).tolist() == counts_on_edges(ints, edges)


@pytest.mark.parametrize("rows", [2, 300], ids=["few-values-sorted", "many-values-compared"])
def test_channel_counts_equal_the_reference_counts_on_both_paths(rows: int) -> None:
    edges = [-1.7, -0.3, 0.3, 0.7]  # -0.3 and 0.7 round down to float32, 0.3 up
    hists = tuple(
        histograms.InputHistogram(
            f"channel_{c}",
            "window",
            c,
            histograms.Bins.of(Histogram.from_dict(m.numeric(f"channel_{c}", edges))),
        )
        for c in range(2)
    )
    values = np.random.default_rng(rows).normal(0, 1, (rows, 2, 8)).astype(np.float32)
    flat = values.reshape(-1)
    for i, edge in enumerate(edges):
        flat[i * 3 : i * 3 + 3] = np.float32(edge)  # exactly at each edge's float32
    flat[-1] = np.nan
    flat[-2] = np.nan
    for hist, (counts, missing) in zip(hists, histograms.count_inputs(hists, values), strict=True):
        channel = values[:, hist.index].reshape(-1)
        # NaN is missing, in no bin (not in the overflow bin, where searchsorted would put it).
        assert missing == int(np.isnan(channel).sum())
        assert counts.tolist() == counts_on_edges(channel[~np.isnan(channel)], edges)
    assert sum(m for _, m in histograms.count_inputs(hists, values)) == 2
