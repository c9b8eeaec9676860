"""Rollout gate samples: one device's evidence (:class:`DeviceSample`) and an arm of them in
columns (:class:`ArmData`), checked field by field. Pure; :mod:`server.gates` judges the arms."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from firmware_bundles import telemetry
from server.gate_config import RATE_GATES, GateConfig, GateInputError


@dataclass(frozen=True)
class DeviceSample:
    """One device's evidence over the evaluation period.

    Attributes:
        device_id: The device.
        aggregate: Its windows on its arm's version, in the server's aggregate form
            (``inference_count``, ``error_count``, ``selftest_failure_count``, ``window_count``,
            ``latency`` sketch, ``outputs``, ``inputs``, ``feedback``, ``labels``).
        baseline: The same form for its windows on the previous version before the rollout
            started (the same calendar period for both arms), or None; sharpens the rate gates.
        install_succeeded: True once it reported the new version running and self-tested, False
            if it reported a failure, None if not known (and for control devices).
        batches_received: Telemetry batches received; ``batches_expected`` those the sequence
            numbers say were sent.
    """

    device_id: str
    aggregate: Mapping[str, Any]
    baseline: Mapping[str, Any] | None = None
    install_succeeded: bool | None = None
    batches_received: int = 0
    batches_expected: int = 0


@dataclass(frozen=True)
class Metric:
    """Per-device values of one two-arm gate (NaN: no evidence) and the evidence behind each."""

    values: np.ndarray
    counts: np.ndarray
    baseline: np.ndarray | None = None  # the same value on the previous version (NaN: none)


@dataclass(frozen=True)
class ArmData:
    """One arm in columns, one row per device (what :func:`judge_arms` reads)."""

    devices: int
    inferences: np.ndarray
    metrics: Mapping[str, Metric]
    outputs: Mapping[str, np.ndarray]  # name -> (devices, bins) counts
    inputs: Mapping[str, np.ndarray]
    install_failed: np.ndarray  # 1.0 failed, 0.0 succeeded, NaN unknown
    batches_received: int = 0
    batches_expected: int = 0
    merged_latency_quantile: float | None = None  # the arm's merged sketch (a figure only)


_COUNT_FIELDS = ("inference_count", "error_count", "selftest_failure_count", "window_count")


def arm_data(samples: Sequence[DeviceSample], config: GateConfig) -> ArmData:
    """One arm's samples in columns, sorted by device id (so sample order never matters).

    Raises:
        GateInputError: Naming the device and field of a malformed sample.
    """
    ordered = sorted(samples, key=lambda s: s.device_id)
    rows = [_device_row(s.aggregate, s.device_id, config) for s in ordered]
    bases = [
        _device_row(s.baseline, s.device_id, config) if s.baseline is not None else None
        for s in ordered
    ]
    metrics: dict[str, Metric] = {}
    for name in RATE_GATES:
        values = np.array([r["metrics"][name][0] for r in rows], dtype=float)
        counts = np.array([r["metrics"][name][1] for r in rows], dtype=float)
        baseline = np.array(
            [b["metrics"][name][0] if b is not None else np.nan for b in bases], dtype=float
        )
        metrics[name] = Metric(values, counts, None if np.isnan(baseline).all() else baseline)
    merged = telemetry.new_sketch(float(rows[0]["latency"]["relative_accuracy"]) if rows else 0.01)
    for s, r in zip(ordered, rows, strict=True):
        try:
            telemetry.merge(merged, r["latency"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GateInputError(f"device {s.device_id}: field 'latency': {exc}") from exc
    return ArmData(
        devices=len(ordered),
        inferences=np.array([r["inferences"] for r in rows], dtype=float),
        metrics=metrics,
        outputs=_histograms(ordered, rows, "outputs"),
        inputs=_histograms(ordered, rows, "inputs"),
        install_failed=np.array(
            [
                np.nan if s.install_succeeded is None else float(not s.install_succeeded)
                for s in ordered
            ],
            dtype=float,
        ),
        batches_received=sum(
            _count(s.batches_received, s.device_id, "batches_received") for s in ordered
        ),
        batches_expected=sum(
            _count(s.batches_expected, s.device_id, "batches_expected") for s in ordered
        ),
        merged_latency_quantile=telemetry.quantile(merged, config.latency.quantile),
    )


def _count(value: Any, device: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GateInputError(f"device {device}: field {name!r} must be a count >= 0, got {value!r}")
    return value


def _device_row(agg: Mapping[str, Any], device: str, config: GateConfig) -> dict[str, Any]:
    """A device's per-gate values (NaN where it has no evidence) from its aggregate."""
    counts = {}
    for name in _COUNT_FIELDS:
        counts[name] = _count(agg.get(name, 0), device, name)
    n, windows = counts["inference_count"], counts["window_count"]
    latency = agg.get("latency") or telemetry.new_sketch()
    if not isinstance(latency, Mapping) or "count" not in latency:
        raise GateInputError(f"device {device}: field 'latency' is not a latency sketch")
    feedback = agg.get("feedback") or {}
    negative = sum(
        _count(feedback.get(k, 0), device, f"feedback.{k}") for k in config.feedback.negative_kinds
    )
    correct = labelled = 0
    for predicted, by_label in (agg.get("labels") or {}).items():
        for label, c in by_label.items():
            labelled += _count(c, device, f"labels.{predicted}.{label}")
            correct += c if label == predicted else 0
    n_lat = int(latency["count"])
    q = telemetry.quantile(dict(latency), config.latency.quantile) if n_lat else None
    enough = n_lat >= config.latency.min_inferences_per_device and q is not None
    nan = float("nan")
    return {
        "inferences": n,
        "latency": latency,
        "outputs": agg.get("outputs") or {},
        "inputs": agg.get("inputs") or {},
        "metrics": {
            "error_rate": (counts["error_count"] / n if n else nan, n),
            "selftest": (counts["selftest_failure_count"] / windows if windows else nan, windows),
            "feedback": (negative / n if n else nan, n),
            "accuracy": (correct / labelled if labelled else nan, labelled),
            "latency": (
                math.log(max(q, telemetry.MIN_POSITIVE)) if enough and q is not None else nan,
                n_lat,
            ),
        },
    }


def _histograms(
    samples: Sequence[DeviceSample], rows: Sequence[dict[str, Any]], kind: str
) -> dict[str, np.ndarray]:
    width: dict[str, int] = {}
    for s, r in zip(samples, rows, strict=True):
        for name, counts in r[kind].items():
            if width.setdefault(name, len(counts)) != len(counts):
                raise GateInputError(
                    f"device {s.device_id}: field '{kind}.{name}' has {len(counts)} bins,"
                    f" others {width[name]}"
                )
    out = {name: np.zeros((len(rows), w)) for name, w in width.items()}
    for i, (s, r) in enumerate(zip(samples, rows, strict=True)):
        for name, counts in r[kind].items():
            out[name][i] = [_count(c, s.device_id, f"{kind}.{name}") for c in counts]
    return out
