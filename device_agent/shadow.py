"""Shadow runs: a candidate model answers a sampled share of real inputs beside the active one.

The caller's thread only decides whether a call is sampled (one ``random()`` against the
fraction) and, if it is, puts the checked inputs and the active model's outputs on a bounded
queue; one worker thread runs the candidate and compares. The caller only ever gets the active
model's answer, and nothing leaves the device but counts (:class:`~firmware_bundles.messages.
ShadowCounts` in the active version's telemetry window). When the queue is full the sample is
dropped and counted as dropped, so a slow candidate never slows the active path.

Agreement: the same top class (an output histogrammed by argmax, or any float output with more
than one column), the same class value, or the same bin of the output's numeric reference
histogram (regression); without any of those, equal outputs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np

from device_agent import histograms
from device_agent.runtime import LoadedModel
from device_agent.telemetry import Recorder
from firmware_bundles.telemetry import DEFAULT_RELATIVE_ACCURACY

log = logging.getLogger("edgefleet.agent.shadow")

#: Results kept by the worker before they are handed to the recorder (one lock per batch).
_RESULTS_PER_HANDOFF = 256


@dataclass(frozen=True)
class ShadowPair:
    """An active model and the candidate that shadows it."""

    active: LoadedModel
    candidate: LoadedModel
    sample_fraction: float
    compare: histograms.OutputHistogram | None

    @classmethod
    def of(cls, active: LoadedModel, candidate: LoadedModel, fraction: float) -> ShadowPair:
        plan = histograms.TelemetryPlan.from_manifest(active.manifest)
        first = plan.outputs[0] if plan.outputs else None
        return cls(active, candidate, fraction, first)

    def agree(self, active_outs: list[Any], candidate_outs: list[Any]) -> bool:
        """Whether the two models' answers to one call agree (see the module docstring)."""
        compare = self.compare
        index = 0
        if compare is not None and compare.output in self.active.output_names:
            index = self.active.output_names.index(compare.output)
        ours = np.asarray(active_outs[index])
        name = self.active.output_names[index]
        other = candidate_outs[
            self.candidate.output_names.index(name) if name in self.candidate.output_names else 0
        ]
        theirs = np.asarray(other)
        if ours.shape != theirs.shape:
            return False
        if compare is not None and compare.mode == "numeric":
            return bool(
                np.array_equal(
                    histograms.count_output(compare, ours), histograms.count_output(compare, theirs)
                )
            )
        argmax = (compare is not None and compare.mode == "argmax") or (
            compare is None and ours.dtype.kind == "f" and ours.ndim >= 2 and ours.shape[-1] > 1
        )
        if argmax:
            return bool(np.array_equal(np.argmax(ours, axis=-1), np.argmax(theirs, axis=-1)))
        return bool(np.array_equal(ours, theirs))


class ShadowRunner:
    """The sampling decision on the caller's thread, the candidate on one worker thread.

    Args:
        recorder: Where the counts go (the active version's windows).
        queue_size: Sampled calls waiting for the worker at most; more are dropped, counted.
        seed: Seeds the sampling (the same seed samples the same calls, in call order).
    """

    def __init__(
        self, recorder: Recorder, *, queue_size: int = 64, seed: int | None = None
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._recorder = recorder
        self._random = random.Random(seed).random
        self._pairs: dict[str, ShadowPair] = {}
        self._queue: queue.Queue[tuple[ShadowPair, float, dict[str, Any], list[Any]] | None] = (
            queue.Queue(queue_size)
        )
        self._dropped: list[tuple[ShadowPair, float]] = []
        self._dropped_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._pending_results = 0
        self._worker: threading.Thread | None = None
        #: Calls sampled so far (the bench reads it to tell sampled calls from unsampled ones).
        self.sampled = 0

    # -- which candidate shadows which model --------------------------------------------------

    def attach(self, active: LoadedModel, candidate: LoadedModel, sample_fraction: float) -> None:
        """Shadow ``active``'s model with ``candidate`` on ``sample_fraction`` of its calls."""
        self._pairs[active.name] = ShadowPair.of(active, candidate, sample_fraction)
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="shadow", daemon=True)
            self._worker.start()

    def detach(self, model: str) -> None:
        """Stop shadowing ``model`` (calls already queued still run)."""
        self._pairs.pop(model, None)

    def candidate(self, model: str) -> LoadedModel | None:
        """The candidate shadowing ``model``, if any."""
        pair = self._pairs.get(model)
        return None if pair is None else pair.candidate

    def sample_fraction(self, model: str) -> float:
        """The share of ``model``'s calls its candidate samples (0 without one)."""
        pair = self._pairs.get(model)
        return 0.0 if pair is None else pair.sample_fraction

    def describe(self, model: str) -> dict[str, Any] | None:
        """JSON-able: the candidate shadowing ``model`` and its sampling, for the status."""
        pair = self._pairs.get(model)
        if pair is None:
            return None
        return {
            "version": pair.candidate.identity.version,
            "bundle_sha256": pair.candidate.bundle_sha256,
            "sample_fraction": pair.sample_fraction,
            "queued": self._queue.qsize(),
        }

    def active(self, model: str) -> bool:
        """Whether ``model`` has a candidate in shadow (Agent.predict asks on every call)."""
        return model in self._pairs

    # -- the caller's thread -------------------------------------------------------------------

    def offer(
        self, active: LoadedModel, when: float, feed: dict[str, Any], outs: list[Any]
    ) -> None:
        """After ``active`` answered: sample the call, queue it for the candidate or drop it."""
        pair = self._pairs.get(active.name)
        if pair is None or pair.active is not active or self._random() >= pair.sample_fraction:
            return
        self.sampled += 1
        try:
            self._queue.put_nowait((pair, when, feed, outs))
        except queue.Full:
            with self._dropped_lock:
                self._dropped.append((pair, when))

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._compare(*item)
                if self._pending_results >= _RESULTS_PER_HANDOFF or self._queue.empty():
                    self._hand_over()
            except Exception:  # the worker must outlive any one sample
                log.exception("shadow comparison failed")
            finally:
                self._queue.task_done()

    def _compare(
        self, pair: ShadowPair, when: float, feed: dict[str, Any], outs: list[Any]
    ) -> None:
        candidate = pair.candidate
        start = perf_counter_ns()
        try:
            theirs = candidate.run_feed(
                {k: v for k, v in feed.items() if k in candidate.input_names}, None
            )
        except Exception:  # onnxruntime raises its own untyped errors
            self._tally(pair, when, sampled=1, errors=1)
            return
        latency_s = (perf_counter_ns() - start) / 1e9
        agreed = pair.agree(outs, theirs)
        self._tally(pair, when, sampled=1, compared=1, agreed=int(agreed), latency_s=latency_s)

    def _tally(
        self, pair: ShadowPair, when: float, *, latency_s: float | None = None, **counts: int
    ) -> None:
        start = int(when // self._recorder.window_s) * self._recorder.window_s
        key = (pair.active.bundle_sha256, pair.candidate.bundle_sha256, start)
        with self._pending_lock:
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = {"pair": pair, "when": when, "latency": []}
            for name, value in counts.items():
                entry[name] = entry.get(name, 0) + value
            if latency_s is not None:
                entry["latency"].append(latency_s)
            self._pending_results += 1

    def _hand_over(self) -> None:
        """Give the recorder every count kept so far (the worker's, and drops since)."""
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, []
        for pair, when in dropped:
            self._tally(pair, when, sampled=1, dropped=1)
        with self._pending_lock:
            pending, self._pending, self._pending_results = self._pending, {}, 0
        for entry in pending.values():
            shadowed: ShadowPair = entry.pop("pair")
            when = entry.pop("when")
            latencies = entry.pop("latency")
            sketch = histograms.latency_sketch(
                np.asarray(latencies, np.float64), DEFAULT_RELATIVE_ACCURACY
            )
            self._recorder.count_shadow(
                shadowed.active.identity,
                when,
                shadowed.candidate.identity,
                latency=sketch,
                **entry,
            )

    # -- draining ------------------------------------------------------------------------------

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait (up to ``timeout_s``) for queued samples to run, then hand every count to the
        recorder, drops included; True when the queue emptied in time."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        self._hand_over()
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        """Drain, then stop the worker."""
        self.drain()
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
            self._worker.join(timeout=5.0)
            self._worker = None
