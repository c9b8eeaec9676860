"""Telemetry on the device: per event-time window and model version, aggregated cheaply.

The hot path (:meth:`Recorder.run`) checks the inputs, runs the model and appends the latency
(``perf_counter_ns``), the event time and one copy of each histogrammed input and output row into
preallocated numpy buffers. Every ``flush_every`` inferences, and on :meth:`Recorder.flush`,
:meth:`Recorder.close_due_windows` and :meth:`Recorder.close`, the buffers are aggregated
vectorised (sketch buckets with ``np.log``, histogram counts by sorting, classes by ``argmax``)
into the open windows, which are written to the :class:`~device_agent.outbox.Outbox`.

What a window counts: ``inference_count`` is every predict call for that model version,
``error_count`` the calls that raised (bad input or ONNX Runtime failure); the latency sketch has
one value per successful call; input and output histograms count the rows (samples) of successful
calls.

Aggregated windows are written at most once per ``persist_every_s`` (monotonic time) when the
buffers fill, and always on an explicit flush, window close and close; so a crash loses at most
the inferences still buffered (under ``flush_every`` per model) and those aggregated in the last
``persist_every_s``. On a device predicting a few times a second every flush is written; under a
bench's tens of thousands per second the SQLite write is not repeated every 256 calls.

Late labels (:meth:`Recorder.label_prediction`) name the time of the prediction they correct and
the model version that made it; they are counted in that version's window of that time (a new
piece of it if that window was already uploaded), which the outbox's map of versions this device
ran (:meth:`~device_agent.outbox.Outbox.remember_version`) makes possible after a version switch
or a restart.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent import histograms
from device_agent.aggregates import InferenceTape, WindowAggregate
from device_agent.errors import InferenceError, InputError, OutboxError
from device_agent.outbox import Outbox, RanVersion
from device_agent.runtime import LoadedModel, ModelIdentity
from firmware_bundles.messages import TALLY_NAME_PATTERN
from firmware_bundles.window_builder import UNKNOWN_INPUT, UNKNOWN_PREDICTION, TelemetryLayout

if TYPE_CHECKING:  # the shadow runner records through this module's Recorder
    from device_agent.shadow import ShadowRunner

_KIND = re.compile(TALLY_NAME_PATTERN)
#: Flushes with nothing recorded after which a model version's buffers are released.
IDLE_FLUSHES_BEFORE_RELEASE = 2
#: Default oldest prediction a late label may correct (30 days): older ones are refused, as the
#: server's raw windows and a device's memory of its versions do not reach further back.
DEFAULT_LABEL_MAX_AGE_S = 30 * 86400.0
#: Default clock disagreement allowed between the labelling app and the agent: a prediction
#: time at most this far in the agent's future is accepted.
DEFAULT_LABEL_CLOCK_SKEW_S = 300.0
_TIME_FORMAT = "an ISO 8601 time with its UTC offset, e.g. 2026-05-01T12:00:00Z"


class Recorder:
    """Aggregates inferences, errors, feedback and labels into windows in the outbox.

    Args:
        outbox: Where windows are stored.
        device_id: The device the windows belong to.
        window_s: Event-time window length (windows start at multiples of it, in Unix time).
        flush_every: Buffered inferences per model before they are aggregated.
        clock: Event time, Unix seconds (``time.time``); called once per inference.
        persist_every_s: Least time between writes of windows when buffers fill.
        monotonic: The clock for ``persist_every_s``.
        label_max_age_s: Oldest prediction (by ``clock``) a late label may name.
        label_clock_skew_s: How far in ``clock``'s future a labelled prediction may lie.
    """

    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        window_s: int = 3600,
        flush_every: int = 256,
        clock: Callable[[], float] | None = None,
        persist_every_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        label_max_age_s: float = DEFAULT_LABEL_MAX_AGE_S,
        label_clock_skew_s: float = DEFAULT_LABEL_CLOCK_SKEW_S,
    ) -> None:
        if not 0 < window_s <= 86400:
            raise ValueError("window_s must be in (0, 86400]")
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        self.outbox = outbox
        self.device_id = device_id
        self.window_s = window_s
        self.flush_every = flush_every
        self._clock = clock or time.time
        self.persist_every_s = persist_every_s
        self._monotonic = monotonic
        self.label_max_age_s = label_max_age_s
        self.label_clock_skew_s = label_clock_skew_s
        self._last_persist = monotonic()
        self._lock = threading.Lock()
        self._tapes: dict[str, InferenceTape] = {}
        #: Windows aggregated into since they were last written.
        self._dirty: dict[int, WindowAggregate] = {}
        self._open: dict[tuple[str, int], WindowAggregate] = {}
        for stored in outbox.open_windows(device_id):
            window = WindowAggregate.from_body(stored.row_id, stored.body)
            self._open[(window.identity.bundle_sha256, window.start)] = window

    # -- hot path -----------------------------------------------------------------------------

    def run(
        self, model: LoadedModel, inputs: Any, shadow: ShadowRunner | None = None
    ) -> dict[str, np.ndarray]:
        """Check ``inputs``, run ``model`` and record the call; the model's outputs by name.

        With ``shadow`` (the model has a candidate in shadow), a sampled share of successful
        calls is handed to it after the answer is ready; the candidate runs on its own thread.

        Raises:
            InputError: If the inputs do not match the schema (counted as an error and as a
                refused call of the input it names).
            InferenceError: If ONNX Runtime fails (counted as an error).
        """
        tape = self._tapes.get(model.bundle_sha256) or self._tape(model)
        try:
            feed = model.check(inputs)
            start = perf_counter_ns()
            outs = model.run_feed(feed, None)
            latency_ns = perf_counter_ns() - start
        except InputError as exc:
            self._error(tape, model, exc.input if exc.input in model.input_names else UNKNOWN_INPUT)
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            self._error(tape, model)
            raise InferenceError(model.name, str(exc)) from exc
        when = self._clock()
        with self._lock:
            if tape.released:
                tape = self._revive(tape, model)
            if tape.append(when, latency_ns, feed, outs):
                self._flush(persist=False)
        if shadow is not None:
            shadow.offer(model, when, feed, outs)
        single = model.single_output
        if single is not None:
            return {single: outs[0]}
        return dict(zip(model.output_names, outs, strict=True))

    def record(
        self,
        model: LoadedModel,
        latency_s: float,
        inputs: Any,
        outputs: dict[str, np.ndarray] | None,
        error: bool = False,
    ) -> None:
        """Record a call made outside :meth:`run` (inputs in any form ``check`` accepts).

        Raises:
            InputError: If ``inputs`` do not match the model's schema.
        """
        tape = self._tapes.get(model.bundle_sha256) or self._tape(model)
        if error or outputs is None:
            self._error(tape, model)
            return
        feed = model.check(inputs)
        outs = [outputs[name] for name in model.output_names]
        with self._lock:
            if tape.released:
                tape = self._revive(tape, model)
            if tape.append(self._clock(), round(latency_s * 1e9), feed, outs):
                self._flush(persist=False)

    def _tape(self, model: LoadedModel) -> InferenceTape:
        with self._lock:
            tape = self._tapes.get(model.bundle_sha256)
            if tape is None:
                # Once per tape (a process's first call of a version, or after it idled): the
                # version is remembered, so its late labels find its bundle after a switch. A
                # failing disk must not stop predictions; its labels are then refused instead.
                with contextlib.suppress(OutboxError):
                    self.outbox.remember_version(_ran(model))
                tape = self._tapes[model.bundle_sha256] = InferenceTape(model, self.flush_every)
            return tape

    def _revive(self, tape: InferenceTape, model: LoadedModel) -> InferenceTape:
        """The live tape of ``model``, for a caller that picked up ``tape`` just before a flush
        released it (so the call is not recorded into a tape nobody drains). Under the lock."""
        live = self._tapes.get(model.bundle_sha256)
        if live is None:
            tape.released, tape.idle_flushes = False, 0
            live = self._tapes[model.bundle_sha256] = tape
        return live

    def _error(self, tape: InferenceTape, model: LoadedModel, refused: str | None = None) -> None:
        with self._lock:
            if tape.released:
                tape = self._revive(tape, model)
            tape.errors.append((self._clock(), refused))
            if len(tape.errors) >= self.flush_every:
                self._flush(persist=False)

    def count_shadow(
        self, identity: ModelIdentity, when: float, candidate: ModelIdentity, **counts: Any
    ) -> None:
        """Add a shadow candidate's counts (see
        :meth:`~firmware_bundles.window_builder.TelemetryWindowBuilder.count_shadow`) into the
        window of ``identity`` (the active version) at ``when``; written at the next flush."""
        with self._lock:
            window = self._window(identity, when)
            window.count_shadow(candidate.version, candidate.bundle_sha256, **counts)
            self._dirty[id(window)] = window

    # -- rare events, written at once ---------------------------------------------------------

    def selftest_failure(self, model: str, version: str, bundle_sha256: str) -> None:
        """Count a failed self-test of a model version (installed, then reverted)."""
        with self._lock:
            window = self._window(ModelIdentity(model, version, bundle_sha256), self._clock())
            window.count_error(self_test=True)
            self._save([window])

    def feedback(self, model: LoadedModel | ModelIdentity, kind: str) -> None:
        """Count user feedback of ``kind`` (e.g. ``thumbs_down``) on ``model``'s predictions.

        Raises:
            InputError: If ``kind`` is not a short name (letters, digits, ``_.:-``).
        """
        _check_name(_identity(model).name, "kind", kind)
        with self._lock:
            window = self._window(_identity(model), self._clock())
            window.count_feedback(kind)
            self._save([window])

    def label(
        self, model: LoadedModel | ModelIdentity, label: str, predicted: str | None = None
    ) -> None:
        """Count a late ground-truth ``label`` in ``model``'s current window, against the
        ``predicted`` one when known (the form for labels that name no prediction time).

        Raises:
            InputError: If a label is not a short name, or (for a model whose manifest declares
                class labels) not one of its classes.
        """
        identity = _identity(model)
        classes = (
            TelemetryLayout.of(model.manifest).classes if isinstance(model, LoadedModel) else None
        )
        check_labels(identity.name, classes, label, predicted)
        with self._lock:
            window = self._window(identity, self._clock())
            window.count_label(label, predicted)
            self._save([window])

    def label_prediction(
        self,
        model: str,
        version: str,
        predicted_at: datetime,
        label: str,
        predicted: str | None = None,
    ) -> None:
        """Count a late ``label`` for the prediction ``version`` of ``model`` made at
        ``predicted_at``: in that version's window of that time, whichever version runs now.

        Raises:
            InputError: If this device never ran ``version`` of ``model``; if ``predicted_at``
                is more than ``label_clock_skew_s`` in the future or older than
                ``label_max_age_s``; if a label is not a short name or not one of that version's
                classes.
        """
        ran = self.outbox.ran_versions(model)
        found = ran.get(version)
        if found is None:
            known = ", ".join(ran) or "none yet"
            raise InputError(
                model, "version", f"a version of {model} this device ran ({known})", repr(version)
            )
        when = check_prediction_time(
            model, predicted_at, self._clock(), self.label_max_age_s, self.label_clock_skew_s
        )
        check_labels(model, found.classes, label, predicted)
        with self._lock:
            identity = ModelIdentity(model, version, found.bundle_sha256)
            window = self._window(identity, when)
            window.count_label(label, predicted)
            self._save([window])

    # -- aggregation --------------------------------------------------------------------------

    def _window(self, identity: ModelIdentity, when: float) -> WindowAggregate:
        start = int(when // self.window_s) * self.window_s
        key = (identity.bundle_sha256, start)
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = WindowAggregate.open(
                self.device_id, identity, start, self.window_s
            )
        return window

    def _drain(self, tape: InferenceTape) -> list[WindowAggregate]:
        touched: dict[int, WindowAggregate] = {}
        n, tape.n = tape.n, 0
        if n:
            lat_s = np.asarray(tape.latency_ns, np.float64) / 1e9
            when_s = np.asarray(tape.when, np.float64)
            tape.latency_ns.clear()
            tape.when.clear()
            ins = {name: buf[:n].reshape((-1, *row[1:])) for name, buf, row in tape.fast_inputs}
            outs = {i: buf[:n].reshape((-1, *row[1:])) for i, buf, row in tape.fast_outputs}
            starts = (when_s // self.window_s).astype(np.int64)
            lo, hi = int(starts.min()), int(starts.max())
            groups = [slice(None)] if lo == hi else [starts == s for s in np.unique(starts)]
            for sel in groups:
                when = float(when_s[sel][0])
                out_by_name = {
                    name: outs[i][sel] for name, i in tape.output_index.items() if i in outs
                }
                self._add(
                    tape,
                    when,
                    lat_s[sel],
                    {k: v[sel] for k, v in ins.items()},
                    out_by_name,
                    touched,
                )
        for when, latency_ns, fed, got in tape.overflow:
            self._add(tape, when, np.asarray([latency_ns / 1e9]), fed, got, touched)
        tape.overflow.clear()
        for when, refused in tape.errors:
            window = self._window(tape.identity, when)
            window.count_error()
            if refused is not None:
                window.count_refused(refused)
            touched[id(window)] = window
        tape.errors.clear()
        return list(touched.values())

    def _add(
        self,
        tape: InferenceTape,
        when: float,
        latency_s: np.ndarray,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        touched: dict[int, WindowAggregate],
    ) -> None:
        window = self._window(tape.identity, when)
        touched[id(window)] = window
        window.merge_latency(
            histograms.latency_sketch(latency_s, window.relative_accuracy), int(latency_s.size)
        )
        for name, hists in tape.input_groups:
            for hist, (counts, missing) in zip(
                hists, histograms.count_inputs(hists, inputs[name]), strict=True
            ):
                window.add_counts("inputs", hist.name, counts.tolist())
                window.count_missing(hist.name, missing)
        for out in tape.plan.outputs:
            if out.output in outputs:
                counts = histograms.count_output(out, outputs[out.output])
                window.add_counts("outputs", out.name, counts.tolist())

    def _save(self, windows: list[WindowAggregate], *, close: bool = False) -> None:
        rows = [(w.row_id, w.device_id, w.start, w.body()) for w in windows]
        for window, row_id in zip(
            windows, self.outbox.save_windows(rows, close=close), strict=True
        ):
            window.row_id = row_id

    def _flush(self, *, persist: bool = True) -> None:
        for key, tape in list(self._tapes.items()):
            touched = self._drain(tape)
            for window in touched:
                self._dirty[id(window)] = window
            # A version that stopped answering (replaced, or unused) gives its buffers back
            # after two idle flushes; the next call makes a new tape.
            tape.idle_flushes = 0 if touched else tape.idle_flushes + 1
            if tape.idle_flushes >= IDLE_FLUSHES_BEFORE_RELEASE:
                tape.released = True
                del self._tapes[key]
        now = self._monotonic()
        if self._dirty and (persist or now - self._last_persist >= self.persist_every_s):
            self._save(list(self._dirty.values()))
            self._dirty.clear()
            self._last_persist = now

    def flush(self) -> None:
        """Aggregate every buffered inference into its window and write the windows.

        Raises:
            OutboxError: If the outbox cannot be written.
        """
        with self._lock:
            self._flush()

    def close_due_windows(
        self, now: datetime | float | None = None, *, include_open: bool = False
    ) -> int:
        """Flush, then close windows that ended by ``now`` (all of them with ``include_open``,
        e.g. before a final upload; later inferences in the same hour start a new partial window,
        which the server adds up). Returns how many were closed.

        Raises:
            OutboxError: If the outbox cannot be written.
        """
        moment = self._clock() if now is None else now
        seconds = moment.timestamp() if isinstance(moment, datetime) else float(moment)
        with self._lock:
            self._flush()
            due = [
                key
                for key, w in self._open.items()
                if include_open or w.start + w.window_s <= seconds
            ]
            windows = [self._open.pop(key) for key in due]
            saved = [w for w in windows if w.row_id is None]
            if saved:
                self._save(saved, close=True)
            self.outbox.close_windows([w.row_id for w in windows if w.row_id is not None])
            return len(windows)

    def stats(self) -> dict[str, Any]:
        """JSON-able: buffered inferences, open windows, unmatched histograms, and the outbox's."""
        with self._lock:
            buffered = sum(t.n + len(t.overflow) + len(t.errors) for t in self._tapes.values())
            unmatched = {
                t.identity.name: list(t.plan.unmatched)
                for t in self._tapes.values()
                if t.plan.unmatched
            }
            return {
                "buffered_inferences": buffered,
                "models_buffered": len(self._tapes),
                "unsaved_windows": len(self._dirty),
                "unmatched_histograms": unmatched,
                **self.outbox.stats(),
            }

    def close(self) -> None:
        """Flush (windows stay open, to be continued after a restart)."""
        self.flush()


def _identity(model: LoadedModel | ModelIdentity) -> ModelIdentity:
    return model.identity if isinstance(model, LoadedModel) else model


def _ran(model: LoadedModel) -> RanVersion:
    identity = model.identity
    classes = TelemetryLayout.of(model.manifest).classes
    return RanVersion(identity.name, identity.version, identity.bundle_sha256, classes)


def parse_prediction_time(model: str, value: object) -> datetime:
    """A label's ``predicted_at``: an ISO 8601 time with its UTC offset (``Z`` or ``+00:00``;
    another offset is converted), or an aware datetime; in UTC.

    Raises:
        InputError: If ``value`` is not such a time (epoch numbers and times without an offset
            are refused: their meaning would be a guess).
    """
    when: datetime | None = None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            when = None
    if when is None or when.tzinfo is None or when.utcoffset() is None:
        raise InputError(model, "predicted_at", _TIME_FORMAT, repr(value))
    return when.astimezone(UTC)


def check_prediction_time(
    model: str, predicted_at: datetime, now_s: float, max_age_s: float, skew_s: float
) -> float:
    """``predicted_at`` in Unix seconds, if it lies in ``[now - max_age, now + skew]``.

    Raises:
        InputError: If it is too far in the future or too old, or not timezone-aware.
    """
    if predicted_at.tzinfo is None:
        raise InputError(model, "predicted_at", _TIME_FORMAT, repr(predicted_at.isoformat()))
    when = predicted_at.timestamp()
    shown = repr(_iso(when))
    if when > now_s + skew_s:
        raise InputError(
            model,
            "predicted_at",
            f"a time no later than the device's clock ({_iso(now_s)}) plus {_span(skew_s)}",
            shown,
        )
    if when < now_s - max_age_s:
        raise InputError(
            model,
            "predicted_at",
            f"a time within {_span(max_age_s)} before the device's clock ({_iso(now_s)})",
            shown,
        )
    return when


def check_labels(
    model: str, classes: frozenset[str] | None, label: str, predicted: str | None
) -> None:
    """Check a late ``label`` and the ``predicted`` class it corrects (when known): short names,
    and (for a model whose manifest declares class labels) among its ``classes``; a prediction
    of :data:`UNKNOWN_PREDICTION` is allowed whatever the classes.

    Raises:
        InputError: Naming the first that is not.
    """
    for what, value in (("label", label), ("predicted", predicted)):
        if value is None:
            continue
        _check_name(model, what, value)
        if classes is not None and value not in classes:
            if what == "predicted" and value == UNKNOWN_PREDICTION:
                continue
            raise InputError(
                model, what, f"one of the model's classes {sorted(classes)}", repr(value)
            )


def _check_name(model: str, what: str, value: str) -> None:
    if not isinstance(value, str) or not _KIND.match(value):
        raise InputError(
            model,
            what,
            "a name of 1-64 letters, digits or _.:- (starting with a letter or digit)",
            repr(value),
        )


def _span(seconds: float) -> str:
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 86400:g} days"
    return f"{seconds:g} s"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
