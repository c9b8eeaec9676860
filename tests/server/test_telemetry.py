"""Delayed telemetry: one fleet trace replayed in order, and shuffled with 30% of batches days late
and 10% duplicated, gives identical rollups (counts exactly, float sums within 1e-9 relative,
sketch quantiles exactly)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from firmware_bundles import telemetry as sketch
from tests.server.conftest import Fleet

DEVICES, BATCHES, WINDOWS = 6, 8, 3


def trace(model: str, prefix: str, bundle_sha256: str) -> list[tuple[str, dict[str, Any]]]:
    """Per device, numbered batches of hourly windows with latencies, outputs, inputs, labels
    (on the test manifest's layout: ``label`` and ``x0`` with 3 counts, classes rest/move)."""
    rng = np.random.default_rng(7)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    batches = []
    for d in range(DEVICES):
        device = f"{prefix}-{d}"
        for seq in range(BATCHES):
            windows = []
            for w in range(WINDOWS):
                n = int(rng.integers(1, 40))
                lat = sketch.new_sketch()
                for value in rng.lognormal(-6, 0.5, n):
                    sketch.add(lat, float(value))
                when = start + timedelta(hours=4 * (seq * WINDOWS + w))
                windows.append(
                    {
                        "device_id": device,
                        "model": model,
                        "version": "1.0.0",
                        "bundle_sha256": bundle_sha256,
                        "window_start": when.isoformat(),
                        "window_s": 3600,
                        "inference_count": n,
                        "error_count": int(rng.integers(0, 2)),
                        "latency": lat,
                        "outputs": [
                            {
                                "name": "label",
                                "counts": rng.multinomial(n, [0.5, 0.5, 0.0]).tolist(),
                            }
                        ],
                        "inputs": [
                            {"name": "x0", "counts": rng.multinomial(n, [0.2, 0.5, 0.3]).tolist()}
                        ],
                        "feedback": {"thumbs_up": int(rng.integers(0, 3))},
                        "labels": {"move": {"move": int(rng.integers(0, 3))}},
                    }
                )
            batches.append(
                (
                    device,
                    {"device_id": device, "boot_epoch": 1, "sequence": seq, "windows": windows},
                )
            )
    return batches


def upload(fleet: Fleet, creds: dict[str, str], batches: list[tuple[str, dict[str, Any]]]) -> int:
    replays = 0
    for device, batch in batches:
        r = fleet.client.post(
            f"/v1/devices/{device}/telemetry",
            content=json.dumps(batch),
            headers=fleet.auth(creds[device]),
        )
        assert r.status_code == 200, r.text
        replays += r.json()["replay"]
    return replays


def rollups(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    r = fleet.client.get(
        f"/v1/telemetry/rollups?model={model}", headers=fleet.auth(fleet.token("viewer"))
    )
    return r.json()  # type: ignore[no-any-return]


def test_shuffled_late_and_duplicated_batches_give_the_same_rollups(fleet: Fleet) -> None:
    bundle_sha256s = {
        m: fleet.publish(fleet.bundle(name=m))["sha256"] for m in ("trace-a", "trace-b")
    }
    in_order = trace("trace-a", "ordered", bundle_sha256s["trace-a"])
    shuffled = trace("trace-b", "shuffled", bundle_sha256s["trace-b"])
    creds = {
        f"{p}-{d}": fleet.enroll(f"{p}-{d}")
        for p in ("ordered", "shuffled")
        for d in range(DEVICES)
    }
    assert upload(fleet, creds, in_order) == 0

    rng = random.Random(11)
    late = set(rng.sample(range(len(shuffled)), k=int(0.3 * len(shuffled))))
    on_time = [b for i, b in enumerate(shuffled) if i not in late]
    rng.shuffle(on_time)
    days_late = [b for i, b in enumerate(shuffled) if i in late]
    rng.shuffle(days_late)
    arrivals = on_time + days_late
    duplicates = rng.sample(arrivals, k=int(0.1 * len(arrivals)))
    for dup in duplicates:
        arrivals.insert(rng.randrange(len(arrivals) + 1), dup)
    assert upload(fleet, creds, arrivals) == len(duplicates)

    a, b = rollups(fleet, "trace-a"), rollups(fleet, "trace-b")
    assert len(a) == len(b) > 1  # the trace spans several event-time days
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "day",
            "inference_count",
            "error_count",
            "window_count",
            "outputs",
            "inputs",
            "feedback",
            "labels",
            "latency_quantiles_s",
        ):
            assert ra[key] == rb[key], key
        assert ra["latency"]["bins"] == rb["latency"]["bins"]
        assert ra["latency"]["count"] == rb["latency"]["count"]
        assert abs(ra["latency"]["sum"] - rb["latency"]["sum"]) <= 1e-9 * abs(ra["latency"]["sum"])
    total = sum(r["inference_count"] for r in a)
    expected = sum(w["inference_count"] for _, batch in in_order for w in batch["windows"])
    assert total == expected


def test_sequence_gaps_give_completeness(fleet: Fleet) -> None:
    cred = fleet.enroll("gappy")
    for seq in (0, 1, 3):  # batch 2 never arrives
        body = {"device_id": "gappy", "boot_epoch": 5, "sequence": seq, "windows": []}
        fleet.client.post(
            "/v1/devices/gappy/telemetry", content=json.dumps(body), headers=fleet.auth(cred)
        )
    info = fleet.client.get("/v1/devices/gappy", headers=fleet.auth(fleet.token("viewer"))).json()
    assert info["telemetry"]["batches_received"] == 3
    assert info["telemetry"]["batches_expected"] == 4
    assert info["telemetry"]["completeness"] == 0.75
    assert info["telemetry"]["skipped_rows"] == 0


def test_malformed_batches_are_refused_with_the_field(fleet: Fleet) -> None:
    cred = fleet.enroll("p")
    r = fleet.client.post(
        "/v1/devices/p/telemetry", content=b'{"device_id":"p"}', headers=fleet.auth(cred)
    )
    assert r.status_code == 422 and "boot_epoch" in r.json()["detail"]
    r = fleet.client.post("/v1/devices/p/telemetry", content=b"not json", headers=fleet.auth(cred))
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
