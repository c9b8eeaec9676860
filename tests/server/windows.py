"""Telemetry windows and batches as devices upload them, shared by the server tests."""

from __future__ import annotations

import json
from typing import Any

from firmware_bundles import telemetry as sketch


def steady_window(
    device_id: str,
    bundle_sha256: str,
    *,
    model: str,
    version: str,
    window_start: str,
    n: int = 400,
    **figures: Any,
) -> dict[str, Any]:
    """An hour's window of ``n`` inferences that took 2 ms each, with the other figures given
    (``error_count``, ``outputs``, ``inputs``, ``feedback``, ``labels``) as they are."""
    latency = sketch.new_sketch(0.01)
    sketch.add(latency, 0.002, n)
    return {
        "device_id": device_id,
        "model": model,
        "version": version,
        "bundle_sha256": bundle_sha256,
        "window_start": window_start,
        "window_s": 3600,
        "inference_count": n,
        "latency": latency,
        **figures,
    }


def shadow_counts(compared: int, agreed: int) -> dict[str, Any]:
    """One shadow version's figures in a window: ``compared`` inferences run on it (all
    sampled, none dropped, 3 ms each), ``agreed`` of them agreeing with the active model."""
    latency = sketch.new_sketch(0.01)
    sketch.add(latency, 0.003, compared)
    return {
        "sampled": compared,
        "dropped": 0,
        "compared": compared,
        "agreed": agreed,
        "errors": 0,
        "latency": latency,
    }


def batch_text(device_id: str, windows: list[dict[str, Any]], sequence: int = 0) -> str:
    """The body of one telemetry upload (boot epoch 1)."""
    return json.dumps(
        {"device_id": device_id, "boot_epoch": 1, "sequence": sequence, "windows": windows}
    )
