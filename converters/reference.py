"""Reference histograms of inputs and outputs on training data, for drift checks in the field.

Numeric bins: edges at training-data quantiles (deduplicated), ``counts[0]`` below the first edge
(underflow), ``counts[-1]`` at or above the last (overflow); the last edge sits just above the
training maximum, so on training data the overflow bin is empty. For inputs with more than one
axis per row (e.g. sensor windows ``[N, channels, time]``), one histogram per channel over all
time steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from firmware_bundles.reference import ReferenceHistograms, encode

DEFAULT_BINS = 10


def numeric_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> list[float]:
    """Quantile edges from ``min`` to just above ``max``, strictly increasing, float32-exact."""
    values = np.asarray(values, dtype=np.float64).ravel()
    qs = np.quantile(values, np.linspace(0.0, 1.0, bins + 1))
    top = np.nextafter(np.float32(values.max()), np.float32(np.inf))
    qs[-1] = float(top)
    edges = np.unique(qs.astype(np.float32)).astype(np.float64)
    return [float(e) for e in edges]


def counts_on_edges(values: np.ndarray, edges: list[float]) -> list[int]:
    """Counts with underflow first and overflow last (``len(edges) + 1`` bins)."""
    index = np.searchsorted(np.asarray(edges), np.asarray(values, np.float64).ravel(), side="right")
    return [int(c) for c in np.bincount(index, minlength=len(edges) + 1)]


def input_histograms(x: np.ndarray, feature_names: list[str] | None = None) -> list[dict[str, Any]]:
    """One numeric histogram per feature (2-D data) or per channel (higher-rank data)."""
    if x.ndim > 2:
        by_channel = np.moveaxis(x, 1, 0)
        names = [f"channel_{i}" for i in range(x.shape[1])]
        series = [by_channel[i].ravel() for i in range(x.shape[1])]
    else:
        names = feature_names or [f"feature_{i}" for i in range(x.shape[1])]
        series = [x[:, i] for i in range(x.shape[1])]
    result = []
    for name, values in zip(names, series, strict=True):
        edges = numeric_edges(values)
        result.append(
            {
                "name": name,
                "kind": "numeric",
                "edges": edges,
                "counts": counts_on_edges(values, edges),
            }
        )
    return result


def output_histograms(
    task: str, outputs: np.ndarray, class_labels: list[Any] | None, output_name: str
) -> list[dict[str, Any]]:
    """Class counts of predictions (plus an empty 'unseen' bin), or bins of predicted values."""
    if task == "classification":
        assert class_labels is not None
        counts = np.bincount(outputs.argmax(axis=1), minlength=len(class_labels))
        return [
            {
                "name": output_name,
                "kind": "categorical",
                "categories": class_labels,
                "counts": [*map(int, counts), 0],
            }
        ]
    values = outputs.ravel()
    edges = numeric_edges(values)
    return [
        {
            "name": output_name,
            "kind": "numeric",
            "edges": edges,
            "counts": counts_on_edges(values, edges),
        }
    ]


def encoded(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> bytes:
    """The reference file (manifest format 3) of these input and output histograms."""
    return encode(ReferenceHistograms.from_dict({"inputs": inputs, "outputs": outputs}))
