"""Telemetry windows kept by an emulated ring or board, read and acknowledged over SMP.

Per model version and event-time window it counts inferences and errors, sketches latency and
bins outputs and inputs on the manifest's reference edges, into the same
:class:`~firmware_bundles.window_builder.TelemetryWindowBuilder` the agent uses. A telemetry read
seals the open windows into numbered pieces; the server adds pieces of the same window together,
so sealing early loses nothing. A late label (:meth:`DeviceTelemetry.record_label`) names the
time and version of its prediction and is counted in that version's window of that time, so the
pieces the phone relays carry it where it belongs with no change to their format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import cbor2
import numpy as np

from device_agent.errors import InputError
from device_agent.telemetry import (
    DEFAULT_LABEL_CLOCK_SKEW_S,
    DEFAULT_LABEL_MAX_AGE_S,
    check_labels,
    check_prediction_time,
)
from firmware_bundles import Manifest
from firmware_bundles.manifest import Histogram
from firmware_bundles.window_builder import (
    TelemetryLayout,
    TelemetryWindowBuilder,
    counted_histograms,
)


@dataclass
class _Piece:
    seq: int
    window: dict[str, Any]


@dataclass
class DeviceTelemetry:
    """The device's telemetry store (RAM: pieces not read before a power cut are lost).

    Attributes:
        device_id: The device's id, written into every window.
        window_s: Window length in seconds.
        clock: The device's clock.
        label_max_age_s: Oldest prediction a late label may name.
        label_clock_skew_s: How far in the device's future a labelled prediction may lie.
    """

    device_id: str
    window_s: int
    clock: Callable[[], datetime]
    label_max_age_s: float = DEFAULT_LABEL_MAX_AGE_S
    label_clock_skew_s: float = DEFAULT_LABEL_CLOCK_SKEW_S
    _open: dict[tuple[str, str, str, int], TelemetryWindowBuilder] = field(default_factory=dict)
    #: (model, version) -> (bundle SHA-256, label classes) of every version that ran. RAM, as a
    #: small ring keeps it beside its windows; a power cut forgets both.
    _ran: dict[tuple[str, str], tuple[str, frozenset[str] | None]] = field(default_factory=dict)
    _sealed: list[_Piece] = field(default_factory=list)
    _next_seq: int = 1

    def record(
        self,
        manifest: Manifest,
        bundle_sha256: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        latency_s: float,
    ) -> None:
        """Count one inference."""
        window = self._window(manifest, bundle_sha256)
        window.count_inference(latency_s)
        counted = counted_histograms(manifest)
        _bin_into(window, "inputs", counted.inputs, _features(inputs))
        first = outputs.get(manifest.outputs[0].name) if manifest.outputs else None
        if first is not None:
            _bin_into(window, "outputs", counted.outputs, _labels(manifest, first))

    def record_error(self, manifest: Manifest, bundle_sha256: str, *, self_test: bool) -> None:
        """Count a failed inference (as an inference and an error), or a failed self-test."""
        self._window(manifest, bundle_sha256).count_error(self_test=self_test)

    def record_label(
        self,
        model: str,
        version: str,
        predicted_at: datetime,
        label: str,
        predicted: str | None = None,
    ) -> None:
        """Count a late ``label`` for the prediction ``version`` of ``model`` made at
        ``predicted_at``, in that version's window of that time.

        Raises:
            ValueError: If this device has not run ``version`` since it booted, if
                ``predicted_at`` is out of range (see the agent's
                :func:`~device_agent.telemetry.check_prediction_time`), or if a label is not a
                short name or not one of the version's classes.
        """
        ran = self._ran.get((model, version))
        if ran is None:
            known = ", ".join(v for m, v in self._ran if m == model) or "none yet"
            raise ValueError(f"{model}: version {version!r} is not one this device ran ({known})")
        bundle_sha256, classes = ran
        try:
            when = check_prediction_time(
                model,
                predicted_at,
                self.clock().timestamp(),
                self.label_max_age_s,
                self.label_clock_skew_s,
            )
            check_labels(model, classes, label, predicted)
        except InputError as exc:
            raise ValueError(str(exc)) from exc
        start = int(when) // self.window_s * self.window_s
        self._builder(model, version, bundle_sha256, start).count_label(label, predicted)

    def seal(self) -> None:
        """Close every open window piece and number it."""
        for key in sorted(self._open, key=lambda k: (k[3], k[0], k[1])):
            window = self._open[key].to_dict()
            # The sketch keeps bucket keys as JSON strings; on the wire they are CBOR integers.
            latency = window["latency"]
            window["latency"] = {**latency, "bins": {int(k): v for k, v in latency["bins"].items()}}
            self._sealed.append(_Piece(self._next_seq, window))
            self._next_seq += 1
        self._open.clear()

    def read(self, max_windows: int | None, budget_bytes: int) -> tuple[list[_Piece], bool]:
        """The oldest sealed pieces that fit in ``budget_bytes`` of CBOR, and whether more wait."""
        chosen: list[_Piece] = []
        used = 0
        for piece in self._sealed:
            if max_windows is not None and len(chosen) >= max_windows:
                break
            size = len(cbor2.dumps({"seq": piece.seq, "window": piece.window}))
            if chosen and used + size > budget_bytes:
                break
            chosen.append(piece)
            used += size
        return chosen, len(chosen) < len(self._sealed)

    def acknowledge(self, upto: int) -> int:
        """Forget pieces with ``seq <= upto``; returns how many remain."""
        self._sealed = [p for p in self._sealed if p.seq > upto]
        return len(self._sealed)

    def _window(self, manifest: Manifest, bundle_sha256: str) -> TelemetryWindowBuilder:
        now = self.clock().astimezone(UTC)
        start = int(now.timestamp()) // self.window_s * self.window_s
        if (manifest.name, manifest.version) not in self._ran:
            classes = TelemetryLayout.of(manifest).classes
            self._ran[(manifest.name, manifest.version)] = (bundle_sha256, classes)
        return self._builder(manifest.name, manifest.version, bundle_sha256, start)

    def _builder(
        self, model: str, version: str, bundle_sha256: str, start: int
    ) -> TelemetryWindowBuilder:
        key = (model, version, bundle_sha256, start)
        if key not in self._open:
            self._open[key] = TelemetryWindowBuilder(
                self.device_id, model, version, bundle_sha256, start, self.window_s
            )
        return self._open[key]


def _features(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per feature (2-D input) or channel (higher rank) values of the first input."""
    if not inputs:
        return []
    x = np.asarray(next(iter(inputs.values())), dtype=np.float64)
    if x.ndim < 2:
        return [x.ravel()]
    if x.ndim == 2:
        return [x[:, i] for i in range(x.shape[1])]
    return [np.moveaxis(x, 1, 0)[i].ravel() for i in range(x.shape[1])]


def _labels(manifest: Manifest, output: np.ndarray) -> list[np.ndarray]:
    if manifest.task == "classification" and output.ndim == 2:
        return [output.argmax(axis=1)]
    return [np.asarray(output, dtype=np.float64).ravel()]


def _bin_into(
    window: TelemetryWindowBuilder,
    kind: Literal["inputs", "outputs"],
    histograms: list[Histogram],
    series: list[np.ndarray],
) -> None:
    for histogram, values in zip(histograms, series, strict=False):
        if histogram.kind == "numeric":
            index = np.searchsorted(np.asarray(histogram.edges), values, side="right")
            bins = np.bincount(index, minlength=len(histogram.edges) + 1)
        else:
            n = len(histogram.categories)
            index = np.where((values >= 0) & (values < n), values, n).astype(np.int64)
            bins = np.bincount(index, minlength=n + 1)
        window.add_counts(kind, histogram.name, bins.tolist())
