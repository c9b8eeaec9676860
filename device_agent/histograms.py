"""Which tensors telemetry histograms, and vectorised counting on the manifest's bins.

A manifest's reference histograms (see :mod:`converters.reference`) name what they describe: an
input feature (``feature_names``, else ``feature_<i>``) of a 2-D input, a channel ``channel_<i>``
(axis 1, over all later axes) of a higher-rank input, or a whole tensor by its own name; outputs
by the output's name (or the only output). :class:`TelemetryPlan` resolves those names once per
model, and the counting functions give counts in the manifest's layout: underflow, one per bin,
overflow (numeric), or one per category plus unseen (categorical). Numeric counts sort the values
once and search the edges in them, which is an order of magnitude faster than searching each
value among the edges; the result is the same as ``searchsorted(edges, v, side="right")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from firmware_bundles import telemetry as sketch
from firmware_bundles.manifest import Histogram, Manifest, TensorSpec
from firmware_bundles.window_builder import counted_histograms

H = TypeVar("H")


@dataclass(frozen=True)
class Bins:
    """A manifest histogram's bins, prepared for counting."""

    kind: Literal["numeric", "categorical"]
    edges: tuple[float, ...] = ()
    categories: tuple[Any, ...] = ()
    edges32: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @classmethod
    def of(cls, histogram: Histogram) -> Bins:
        edges = tuple(float(e) for e in histogram.edges)
        return cls(histogram.kind, edges, tuple(histogram.categories), _float32_edges(edges))

    @property
    def size(self) -> int:
        """Number of counts: bins plus under/overflow, or categories plus unseen."""
        return len(self.edges) + 1 if self.kind == "numeric" else len(self.categories) + 1


def _float32_edges(edges: tuple[float, ...]) -> np.ndarray:
    """For each edge ``e``, the smallest float32 ``f >= e``: for float32 ``v``, ``v < e`` iff
    ``v < f``, so float32 values compare exactly without widening them to float64."""
    exact = np.asarray(edges, dtype=np.float64)
    with np.errstate(over="ignore"):
        f32 = exact.astype(np.float32)
    low = f32.astype(np.float64) < exact
    f32[low] = np.nextafter(f32[low], np.float32(np.inf))
    return f32


@dataclass(frozen=True)
class InputHistogram:
    """One reference input histogram and the tensor slice it describes."""

    name: str
    input: str
    #: Index on axis 1 (feature or channel), or None for the whole tensor.
    index: int | None
    bins: Bins


@dataclass(frozen=True)
class OutputHistogram:
    """One output histogram: class of each prediction (argmax), label value, or numeric bins."""

    name: str
    output: str
    mode: Literal["argmax", "value", "numeric"]
    bins: Bins


@dataclass(frozen=True)
class TelemetryPlan:
    """What a model's telemetry counts, resolved once from its manifest."""

    inputs: tuple[InputHistogram, ...]
    outputs: tuple[OutputHistogram, ...]
    #: Reference histograms that name nothing in the schema (reported in status, not counted).
    unmatched: tuple[str, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> TelemetryPlan:
        counted = counted_histograms(manifest)

        def input_histogram(hist: Histogram) -> InputHistogram | None:
            found = _find_input(manifest.inputs, hist)
            return None if found is None else InputHistogram(hist.name, *found, Bins.of(hist))

        unmatched: list[str] = []
        inputs = _matched(counted.inputs, input_histogram, unmatched)
        outputs = _matched(counted.outputs, lambda h: _find_output(manifest.outputs, h), unmatched)
        return cls(tuple(inputs), tuple(outputs), tuple(unmatched))

    def input_names(self) -> set[str]:
        """Inputs whose values are histogrammed."""
        return {h.input for h in self.inputs}

    def by_input(self) -> dict[str, tuple[InputHistogram, ...]]:
        """The input histograms grouped by the input they count."""
        groups: dict[str, list[InputHistogram]] = {}
        for hist in self.inputs:
            groups.setdefault(hist.input, []).append(hist)
        return {name: tuple(hists) for name, hists in groups.items()}

    def output_names(self) -> set[str]:
        """Outputs whose values are histogrammed."""
        return {h.output for h in self.outputs}


def _slice_names(spec: TensorSpec) -> list[str] | None:
    if len(spec.shape) < 2:
        return None
    width = spec.shape[1]
    if len(spec.shape) == 2:
        if spec.feature_names:
            return list(spec.feature_names)
        return None if width is None else [f"feature_{i}" for i in range(width)]
    return None if width is None else [f"channel_{i}" for i in range(width)]


def _matched(
    hists: list[Histogram], find: Callable[[Histogram], H | None], unmatched: list[str]
) -> list[H]:
    """What ``find`` makes of each reference histogram; the names it finds nothing for are
    added to ``unmatched``."""
    found = []
    for hist in hists:
        made = find(hist)
        if made is None:
            unmatched.append(hist.name)
        else:
            found.append(made)
    return found


def _find_input(specs: list[TensorSpec], hist: Histogram) -> tuple[str, int | None] | None:
    for spec in specs:
        if spec.name == hist.name:
            return spec.name, None
    for spec in specs:
        if spec.dtype == "string" and hist.kind == "numeric":
            continue
        names = _slice_names(spec)
        if names and hist.name in names:
            return spec.name, names.index(hist.name)
    return None


def _find_output(specs: list[TensorSpec], hist: Histogram) -> OutputHistogram | None:
    spec = next((s for s in specs if s.name == hist.name), None)
    if spec is None and len(specs) == 1:
        spec = specs[0]
    if spec is None and hist.kind == "categorical":
        spec = next((s for s in specs if s.class_labels), None)
    if spec is None:
        return None
    bins = Bins.of(hist)
    floating = spec.dtype in ("float32", "float16")
    if hist.kind == "numeric":
        return (
            None
            if spec.dtype == "string"
            else OutputHistogram(hist.name, spec.name, "numeric", bins)
        )
    mode: Literal["argmax", "value"] = "argmax" if floating else "value"
    return OutputHistogram(hist.name, spec.name, mode, bins)


def slices(values: np.ndarray, index: int | None) -> np.ndarray:
    """The values a histogram counts: axis-1 slice ``index`` of a batch, or all of it, flat."""
    if index is None:
        return values.reshape(-1)
    return values[:, index].reshape(-1)


def _comparable(values: np.ndarray) -> np.ndarray:
    """float32 stays (compared with ``edges32``); everything else is widened to float64."""
    if values.dtype == np.float32:
        return values
    if values.dtype == np.float16:
        return values.astype(np.float32)
    return values.astype(np.float64)


def _counts_sorted(ordered: np.ndarray, bins: Bins) -> tuple[np.ndarray, int]:
    """Counts of sorted values on numeric bins, and how many were NaN (sorted last, in no
    bin)."""
    edges = bins.edges32 if ordered.dtype == np.float32 else np.asarray(bins.edges, np.float64)
    below = np.searchsorted(ordered, edges, side="left")
    numbers = ordered.size
    if ordered.dtype.kind == "f" and numbers and ordered[-1] != ordered[-1]:
        numbers = int(np.searchsorted(ordered, np.nan, side="left"))
    return np.diff(below, prepend=0, append=numbers), ordered.size - numbers


def count_numeric(values: np.ndarray, bins: Bins) -> np.ndarray:
    """Counts of ``values`` (any shape) on numeric bins: underflow, bins, overflow; NaN is in
    no bin (:func:`count_input` counts it as missing)."""
    return _counts_sorted(np.sort(_comparable(values.reshape(-1))), bins)[0]


#: Past this many values per edge, counting values below each edge (one vectorised comparison
#: per edge) beats sorting; under it, one sort of every slice together makes fewer numpy calls.
COMPARE_VALUES_PER_EDGE = 64


def _counts_by_comparison(values: np.ndarray, bins: Bins) -> tuple[np.ndarray, int]:
    flat = _comparable(values)
    edges = bins.edges32 if flat.dtype == np.float32 else np.asarray(bins.edges, np.float64)
    # NaN is below no edge and at or above none either: it is counted apart, as missing.
    below = [np.count_nonzero(flat < edge) for edge in edges.tolist()]
    missing = int(np.count_nonzero(np.isnan(flat))) if flat.dtype.kind == "f" else 0
    return np.diff(np.asarray(below, np.int64), prepend=0, append=flat.size - missing), missing


def count_inputs(
    hists: tuple[InputHistogram, ...], values: np.ndarray
) -> list[tuple[np.ndarray, int]]:
    """Counts of several histograms of one input over a batch (batch on axis 0), in order,
    each with its number of missing values (NaN, None), which are in no bin.

    Numeric feature or channel histograms over many values (a sensor window's channels) count
    the values below each edge; over few values (a 64-feature row) they are sorted together in
    one call, one row per feature, not one call each.
    """
    results: list[tuple[np.ndarray, int] | None] = [None] * len(hists)
    per_slice = values[:1, 0].size * len(values) if values.ndim > 1 else 0
    together = []
    for i, h in enumerate(hists):
        if h.index is None or h.bins.kind != "numeric":
            continue
        if per_slice >= COMPARE_VALUES_PER_EDGE * max(len(h.bins.edges), 1):
            results[i] = _counts_by_comparison(values[:, h.index], h.bins)
        else:
            together.append(i)
    slices = [int(hists[i].index or 0) for i in together]
    if together:
        # Fancy indexing copies, so the copy can be sorted in place.
        by_slice = np.moveaxis(values, 1, 0)[slices]
        ordered = _comparable(by_slice.reshape(len(together), -1))
        ordered.sort(axis=1)
        for row, i in zip(ordered, together, strict=True):
            results[i] = _counts_sorted(row, hists[i].bins)
    return [
        counts if counts is not None else count_input(hist, values)
        for counts, hist in zip(results, hists, strict=True)
    ]


def count_categories(values: np.ndarray, bins: Bins) -> np.ndarray:
    """Counts of label values on categories, the last count for values outside them."""
    return _count_categories(values, bins)[0]


def _count_categories(values: np.ndarray, bins: Bins) -> tuple[np.ndarray, int]:
    """Counts on categories (the last for unseen ones), and the missing values (None, NaN),
    which are in no bin."""
    counts = np.zeros(bins.size, dtype=np.int64)
    flat = values.reshape(-1)
    missing = 0
    if flat.dtype.kind == "O":
        absent = np.fromiter((v is None or v != v for v in flat.tolist()), bool, flat.size)
        missing = int(np.count_nonzero(absent))
        if missing:
            flat = flat[~absent]
    elif flat.dtype.kind == "f":
        absent = np.isnan(flat)
        missing = int(np.count_nonzero(absent))
        flat = flat[~absent]
    uniques, tallies = np.unique(flat, return_counts=True)
    index = {_plain(c): i for i, c in enumerate(bins.categories)}
    for value, tally in zip(uniques.tolist(), tallies.tolist(), strict=True):
        counts[index.get(_plain(value), bins.size - 1)] += tally
    return counts, missing


def count_argmax(scores: np.ndarray, bins: Bins) -> np.ndarray:
    """Counts of each row's top class (last axis); classes past the labels count as unseen."""
    classes = np.argmax(scores.reshape(-1, scores.shape[-1]), axis=1)
    return np.bincount(np.minimum(classes, bins.size - 1), minlength=bins.size)


def count_output(hist: OutputHistogram, values: np.ndarray) -> np.ndarray:
    """Counts of one output histogram over a batch of output values."""
    if hist.mode == "argmax":
        return count_argmax(values, hist.bins)
    if hist.mode == "value":
        return count_categories(values, hist.bins)
    return count_numeric(values, hist.bins)


def count_input(hist: InputHistogram, values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of one input histogram over a batch of input values (batch on axis 0), and its
    missing values (NaN, None: in no bin)."""
    selected = slices(values, hist.index)
    if hist.bins.kind == "categorical":
        return _count_categories(selected, hist.bins)
    return _counts_sorted(np.sort(_comparable(selected)), hist.bins)


def _plain(value: Any) -> Any:
    # JSON categories are str or int; values may be numpy scalars, bytes or floats like 2.0.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def latency_sketch(latency_s: np.ndarray, relative_accuracy: float) -> dict[str, Any]:
    """A sketch of ``latency_s`` equal, bucket for bucket, to adding each value with
    :func:`firmware_bundles.telemetry.add`, values clamped to ``[0, MAX_LATENCY_S]`` as there
    (numpy's log may differ from libm's in the last bit, so values whose bucket index lies within
    rounding of an integer are redone with ``math``)."""
    result = sketch.new_sketch(relative_accuracy)
    if latency_s.size == 0:
        return result
    # Clamped as :func:`~firmware_bundles.telemetry.add` clamps, so the sketch stays in range.
    latency_s = np.clip(latency_s, 0.0, sketch.MAX_LATENCY_S)
    positive = latency_s[latency_s > sketch.MIN_POSITIVE]
    gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
    log_gamma = math.log(gamma)
    ratio = np.log(positive) / log_gamma
    keys = np.ceil(ratio).astype(np.int64)
    close = np.abs(ratio - np.rint(ratio)) < 1e-9
    for i in np.flatnonzero(close).tolist():
        keys[i] = math.ceil(math.log(float(positive[i])) / log_gamma)
    if keys.size:
        low = int(keys.min())
        tally = np.bincount(keys - low)
        present = np.flatnonzero(tally)
        result["bins"] = {
            str(k + low): c for k, c in zip(present.tolist(), tally[present].tolist(), strict=True)
        }
    result["zero_count"] = int(latency_s.size - positive.size)
    result["count"] = int(latency_s.size)
    result["sum"] = float(latency_s.sum())
    result["min"] = float(latency_s.min())
    result["max"] = float(latency_s.max())
    return result
