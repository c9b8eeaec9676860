"""Data-quality and shadow figures of an aggregate: what the metrics and drift APIs show, the
gates judge and the triggers watch. Pure: an aggregate (and the manifest's bins) in, figures out.

Data quality per input feature (docs/telemetry.md, "Data quality"): ``missing`` (NaN, None: in
no bin), ``out_of_range`` (numeric: the underflow and overflow bins, as the reference's first
edge is the training minimum and its last the next float32 above the training maximum) and
``unseen`` (categorical: the last bin); each as a count and a share of the feature's values
(binned plus missing). ``refused``: calls the schema check refused, per input, and their share
of all calls. Shadow: per candidate version, agreement with the version that answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from firmware_bundles import telemetry as sketch
from firmware_bundles.manifest import Histogram

QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def feature_quality(
    name: str, counts: list[int] | None, missing: int, histogram: Histogram | None
) -> dict[str, Any]:
    """One feature's data-quality figures from its window counts and its manifest histogram."""
    counts = counts or []
    binned = sum(counts)
    values = binned + missing
    kind = histogram.kind if histogram is not None else None
    out_of_range = counts[0] + counts[-1] if kind == "numeric" and len(counts) >= 2 else 0
    unseen = counts[-1] if kind == "categorical" and counts else 0
    return {
        "name": name,
        "kind": kind,
        "values": values,
        "missing": missing,
        "missing_rate": _share(missing, values),
        "out_of_range": out_of_range,
        "out_of_range_rate": _share(out_of_range, values),
        "unseen": unseen,
        "unseen_rate": _share(unseen, values),
    }


def data_quality(agg: Mapping[str, Any], histograms: Mapping[str, Histogram]) -> dict[str, Any]:
    """The data-quality figures of an aggregate; ``histograms``: the manifest's input
    histograms by name (for the kind of each feature)."""
    quality = agg.get("quality") or {}
    missing = quality.get("missing") or {}
    refused = quality.get("refused") or {}
    names = sorted(set(agg.get("inputs") or {}) | set(missing))
    features = [
        feature_quality(
            name,
            (agg.get("inputs") or {}).get(name),
            int(missing.get(name, 0)),
            histograms.get(name),
        )
        for name in names
    ]
    calls = int(agg.get("inference_count", 0))
    total_refused = sum(int(c) for c in refused.values())
    return {
        "features": features,
        "refused": dict(sorted(refused.items())),
        "refused_total": total_refused,
        "refused_rate": _share(total_refused, calls),
    }


def worst_rate(figures: Mapping[str, Any]) -> tuple[str, float]:
    """The highest data-quality share among a :func:`data_quality` result's features and the
    refused calls, with what it is (``feature:kind`` or ``refused``); 0 when none."""
    worst = ("none", 0.0)
    for feature in figures["features"]:
        for kind in ("missing", "out_of_range", "unseen"):
            rate = feature[f"{kind}_rate"]
            if rate is not None and rate > worst[1]:
                worst = (f"{feature['name']}:{kind}", rate)
    refused = figures["refused_rate"]
    if refused is not None and refused > worst[1]:
        worst = ("refused", refused)
    return worst


def shadow(agg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per candidate version run in shadow beside the aggregate's version: its counts,
    agreement (agreed / compared), error rate and latency quantiles."""
    rows = []
    for version, entry in sorted((agg.get("shadow") or {}).items()):
        latency = entry["latency"]
        compared = int(entry["compared"])
        rows.append(
            {
                "candidate_version": version,
                "sampled": entry["sampled"],
                "dropped": entry["dropped"],
                "compared": compared,
                "agreed": entry["agreed"],
                "agreement": _share(int(entry["agreed"]), compared),
                "errors": entry["errors"],
                "error_rate": _share(int(entry["errors"]), compared + int(entry["errors"])),
                "latency_s": {
                    "count": latency["count"],
                    "mean": latency["sum"] / latency["count"] if latency["count"] else None,
                    **{name: sketch.quantile(latency, q) for name, q in QUANTILES.items()},
                },
            }
        )
    return rows
