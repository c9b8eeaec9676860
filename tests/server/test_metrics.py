"""Per-version metrics and drift through the real app on SQLite and PostgreSQL.

Devices' windows are made here the way a device makes them, from raw values binned on the
manifest's edges; the expected figures are computed directly from those raw values with numpy
and scipy (not with the server's code).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency
from sqlmodel import Session, func, select

from firmware_bundles import build
from firmware_bundles import telemetry as sketch
from server.models import TelemetryWindowRecord
from tests.conftest import MODEL_BYTES, manifest_draft
from tests.server.conftest import Fleet

EDGES = [-2.0, -1.0, 0.0, 1.0, 2.0]
CLASSES = ["rest", "move", "run"]
DAY0 = datetime(2026, 3, 2, tzinfo=UTC)


def draft(name: str, version: str, counter: int = 1) -> dict[str, Any]:
    """A three-class model with one input on :data:`EDGES` (a drift baseline to compare with)."""
    draft = manifest_draft(name=name, version=version, release_counter=counter)
    draft["outputs"][0]["class_labels"] = CLASSES
    draft["outputs"][0]["shape"] = [None, 3]
    draft["self_test"]["vectors"][0]["expected"] = {"probabilities": [[0.2, 0.3, 0.5]]}
    draft["reference_histograms"] = {
        "inputs": [
            {"name": "x0", "kind": "numeric", "edges": EDGES, "counts": [5, 10, 35, 35, 10, 5]}
        ],
        "outputs": [
            {
                "name": "label",
                "kind": "categorical",
                "categories": CLASSES,
                "counts": [50, 30, 20, 0],
            }
        ],
    }
    return draft


def publish(fleet: Fleet, name: str, version: str, counter: int = 1) -> str:
    data = build(draft(name, version, counter), {"model.onnx": MODEL_BYTES}, [fleet.release_key])
    return str(fleet.publish(data)["sha256"])


def bins(values: np.ndarray) -> list[int]:
    """Counts on the manifest layout: under, [e0, e1), ..., at or above the last edge."""
    return np.bincount(
        np.searchsorted(EDGES, values, side="right"), minlength=len(EDGES) + 1
    ).tolist()


@dataclass
class Raw:
    """What one device saw in one window, raw."""

    device: str
    start: datetime
    x0: np.ndarray
    predicted: np.ndarray  # class index per inference
    latency_s: np.ndarray
    errors: int
    labels: list[tuple[int, int]] = field(default_factory=list)  # (predicted, true)
    feedback: int = 0


def window(raw: Raw, model: str, version: str, bundle_sha256: str) -> dict[str, Any]:
    latency = sketch.new_sketch(0.01)
    for v in raw.latency_s:
        sketch.add(latency, float(v))
    labels: dict[str, dict[str, int]] = {}
    for p, t in raw.labels:
        tally = labels.setdefault(CLASSES[p], {})
        tally[CLASSES[t]] = tally.get(CLASSES[t], 0) + 1
    return {
        "device_id": raw.device,
        "model": model,
        "version": version,
        "bundle_sha256": bundle_sha256,
        "window_start": raw.start.isoformat(),
        "window_s": 3600,
        "inference_count": len(raw.x0),
        "error_count": raw.errors,
        "latency": latency,
        "outputs": [
            {"name": "label", "counts": [*np.bincount(raw.predicted, minlength=3).tolist(), 0]}
        ],
        "inputs": [{"name": "x0", "counts": bins(raw.x0)}],
        "feedback": {"thumbs_down": raw.feedback} if raw.feedback else {},
        "labels": labels,
    }


def make_raw(
    rng: np.random.Generator, devices: list[str], days: int, shift: float = 0.0
) -> list[Raw]:
    out = []
    for d in devices:
        for day in range(days):
            for hour in (3, 11, 19):
                n = int(rng.integers(5, 40))
                predicted = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
                true = np.where(rng.random(n) < 0.8, predicted, rng.integers(0, 3, n))
                labelled = rng.random(n) < 0.3
                out.append(
                    Raw(
                        device=d,
                        start=DAY0 + timedelta(days=day, hours=hour),
                        x0=rng.normal(shift, 1.0, n),
                        predicted=predicted,
                        latency_s=rng.lognormal(-6, 0.5, n),
                        errors=int(rng.integers(0, 2)),
                        labels=[
                            (int(p), int(t))
                            for p, t, k in zip(predicted, true, labelled, strict=True)
                            if k
                        ],
                        feedback=int(rng.integers(0, 3)),
                    )
                )
    return out


class Uploader:
    """Enrolls devices once and sends their batches, each device with its own sequence."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.creds: dict[str, str] = {}
        self.sequence: dict[str, int] = {}

    def send(self, device: str, windows: list[dict[str, Any]], sequence: int | None = None) -> int:
        if device not in self.creds:
            self.creds[device] = self.fleet.enroll(device)
            self.sequence[device] = 0
        if sequence is None:
            sequence = self.sequence[device]
            self.sequence[device] += 1
        body = {"device_id": device, "boot_epoch": 1, "sequence": sequence, "windows": windows}
        r = self.fleet.client.post(
            f"/v1/devices/{device}/telemetry",
            content=json.dumps(body),
            headers=self.fleet.auth(self.creds[device]),
        )
        assert r.status_code == 200, r.text
        return sequence


def get(fleet: Fleet, path: str, role: str = "operator", **params: Any) -> Any:
    r = fleet.client.get(path, params=params, headers=fleet.auth(fleet.token(role)))
    assert r.status_code == 200, r.text
    return r.json()


def metrics(fleet: Fleet, model: str, version: str, role: str = "operator", **params: Any) -> Any:
    return get(fleet, f"/v1/models/{model}/versions/{version}/metrics", role, **params)


def direct_drift(a: list[int], b: list[int]) -> dict[str, float]:
    p, q = np.array(a, float) / sum(a), np.array(b, float) / sum(b)
    pe, qe = np.where(p == 0, 1e-4, p), np.where(q == 0, 1e-4, q)
    keep = (np.array(a) + np.array(b)) > 0
    stat, pv, _, _ = chi2_contingency(
        np.vstack([np.array(a)[keep], np.array(b)[keep]]), correction=False
    )
    return {
        "psi": float(np.sum((pe - qe) * np.log(pe / qe))),
        "js_divergence_bits": float(jensenshannon(p, q, base=2) ** 2),
        "chi2": float(stat),
        "chi2_p_value": float(pv),
        "max_abs_proportion_diff": float(np.max(np.abs(p - q))),
    }


def test_drift_and_accuracy_equal_a_direct_computation(fleet: Fleet) -> None:
    rng = np.random.default_rng(11)
    v1, v2 = publish(fleet, "gait", "1.0.0"), publish(fleet, "gait", "1.1.0", 2)
    devices = [f"ring-{i}" for i in range(6)]
    first, second = make_raw(rng, devices, 3), make_raw(rng, devices, 3, shift=0.4)
    up = Uploader(fleet)
    for raws, version, bundle_sha256 in ((first, "1.0.0", v1), (second, "1.1.0", v2)):
        for d in devices:
            up.send(d, [window(r, "gait", version, bundle_sha256) for r in raws if r.device == d])
    # A span that cuts its first and last day: windows are counted by their start time.
    start, end = DAY0 + timedelta(hours=10), DAY0 + timedelta(days=2, hours=12)
    inside = [r for r in second if start <= r.start < end]
    params = {"from": start.isoformat(), "to": end.isoformat()}
    x0 = np.concatenate([r.x0 for r in inside])
    predicted = np.concatenate([r.predicted for r in inside])
    reference = [5, 10, 35, 35, 10, 5]
    got = get(fleet, "/v1/models/gait/versions/1.1.0/drift", **params)
    assert got["psi_zero_proportion"] == 1e-4
    [feature] = got["drift"]["inputs"]
    assert feature["counts"] == bins(x0) and feature["baseline_counts"] == reference
    for name, value in direct_drift(bins(x0), reference).items():
        assert feature[name] == pytest.approx(value, abs=1e-9, rel=1e-9), name
    [output] = got["drift"]["outputs"]
    outputs = [*np.bincount(predicted, minlength=3).tolist(), 0]
    for name, value in direct_drift(outputs, [50, 30, 20, 0]).items():
        assert output[name] == pytest.approx(value, abs=1e-9, rel=1e-9), name
    # Against the other version over the same span.
    other = np.concatenate([r.x0 for r in first if start <= r.start < end])
    got = get(fleet, "/v1/models/gait/versions/1.1.0/drift", against="1.0.0", **params)
    [feature] = got["drift"]["inputs"]
    assert feature["baseline_counts"] == bins(other)
    for name, value in direct_drift(bins(x0), bins(other)).items():
        assert feature[name] == pytest.approx(value, abs=1e-9, rel=1e-9), name
    # Metrics over the same span.
    m = metrics(fleet, "gait", "1.1.0", **params)["total"]
    pairs = [pt for r in inside for pt in r.labels]
    assert m["inferences"] == len(x0)
    assert m["devices_reporting"] == 6
    assert m["errors"] == sum(r.errors for r in inside)
    assert m["accuracy"]["labels"] == len(pairs)
    assert m["accuracy"]["value"] == pytest.approx(
        sum(p == t for p, t in pairs) / len(pairs), abs=1e-12
    )
    assert m["feedback"]["thumbs_down"]["count"] == sum(r.feedback for r in inside)
    assert m["outputs"][0]["counts"] == outputs
    latency = np.concatenate([r.latency_s for r in inside])
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        exact = float(np.quantile(latency, q, method="lower"))
        assert m["latency_s"][name] == pytest.approx(exact, rel=0.021), name


def _uploads_in_order(raws: list[Raw]) -> list[tuple[str, list[Raw]]]:
    """Per device, a batch per day in event-time order."""
    batches: dict[tuple[str, str], list[Raw]] = {}
    for r in sorted(raws, key=lambda r: (r.device, r.start)):
        batches.setdefault((r.device, r.start.date().isoformat()), []).append(r)
    return [(device, rs) for (device, _), rs in batches.items()]


def _same_figures(a: dict[str, Any], b: dict[str, Any], path: str = "") -> None:
    """Counts and quantiles bit-identical; sums and means within 1e-12 relative."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_figures(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_figures(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.rsplit(".", 1)[-1] in {
        "mean",
        "rate",
        "value",
        "error_rate",
        "ratio",
    }:
        assert a == pytest.approx(b, rel=1e-12, abs=0), path
    else:
        assert a == b, path


def _published_with_raw(
    fleet: Fleet, models: tuple[str, ...], prefix: str, devices: int, days: int, *, seed: int
) -> tuple[dict[str, str], list[Raw], Uploader]:
    """Version 1.0.0 of each of ``models`` published (their SHA-256s by name), ``days`` days of
    raw values for devices ``prefix-0``, ..., and an uploader for them."""
    shas = {m: publish(fleet, m, "1.0.0") for m in models}
    names = [f"{prefix}-{i}" for i in range(devices)]
    return shas, make_raw(np.random.default_rng(seed), names, days), Uploader(fleet)


def test_late_shuffled_and_duplicated_uploads_give_the_same_metrics(fleet: Fleet) -> None:
    shas, raws, up = _published_with_raw(fleet, ("inorder", "late"), "phone", 7, 14, seed=5)
    for device, rs in _uploads_in_order(raws):
        up.send(device, [window(r, "inorder", "1.0.0", shas["inorder"]) for r in rs])
    # The same windows arriving 1-14 days late, shuffled, and a fifth of the batches sent twice.
    shuffle = random.Random(3)
    batches = []
    for device, rs in _uploads_in_order(raws):
        rs = rs[:]
        shuffle.shuffle(rs)
        arrives = rs[0].start + timedelta(days=shuffle.randint(1, 14), minutes=shuffle.random())
        batches.append((arrives, device, rs))
    batches.sort(key=lambda b: b[0])
    for _, device, rs in batches:
        windows = [window(r, "late", "1.0.0", shas["late"]) for r in rs]
        sequence = up.send(device, windows)
        if shuffle.random() < 0.2:
            up.send(device, windows, sequence=sequence)  # a replay: counted once
    params = {"from": DAY0.date().isoformat(), "to": (DAY0 + timedelta(days=13)).date().isoformat()}
    a, b = metrics(fleet, "inorder", "1.0.0", **params), metrics(fleet, "late", "1.0.0", **params)
    assert a["total"]["inferences"] == sum(len(r.x0) for r in raws)
    assert len(a["days"]) == 14
    for m in (a, b):  # completeness covers the devices' batches of both models: the same
        del m["span"]
    _same_figures(a, b)


def test_erasing_a_device_changes_every_aggregate_by_exactly_its_contribution(fleet: Fleet) -> None:
    shas, raws, up = _published_with_raw(fleet, ("kept", "all"), "ring", 6, 4, seed=9)
    for device, rs in _uploads_in_order(raws):
        up.send(device, [window(r, "all", "1.0.0", shas["all"]) for r in rs])
        if device != "ring-3":
            up.send(device, [window(r, "kept", "1.0.0", shas["kept"]) for r in rs])
    params = {"from": DAY0.date().isoformat(), "to": (DAY0 + timedelta(days=3)).date().isoformat()}
    before = metrics(fleet, "all", "1.0.0", **params)
    gone = [r for r in raws if r.device == "ring-3"]
    r = fleet.client.delete(
        "/v1/devices/ring-3/telemetry", headers=fleet.auth(fleet.token("operator"))
    )
    assert r.status_code == 403, r.text
    r = fleet.client.delete("/v1/devices/ring-3/telemetry", headers=fleet.auth(fleet.admin))
    assert r.status_code == 200, r.text
    assert r.json()["windows"] == 2 * len(gone) - len(gone)  # its windows of "all" only
    after = metrics(fleet, "all", "1.0.0", **params)
    assert before["total"]["inferences"] - after["total"]["inferences"] == sum(
        len(r.x0) for r in gone
    )
    assert before["total"]["devices_reporting"] - after["total"]["devices_reporting"] == 1
    with Session(fleet.state.engine) as session:
        left = session.exec(
            select(func.count())
            .select_from(TelemetryWindowRecord)
            .where(TelemetryWindowRecord.device_id == "ring-3")
        ).one()
    assert left == 0
    kept = metrics(fleet, "kept", "1.0.0", **params)
    for m in (after, kept):
        del m["span"]
        for group in (m["total"], *m["days"]):
            del group["completeness"]  # the other devices' batches differ in number
    _same_figures(after, kept)
    rollups = get(fleet, "/v1/telemetry/rollups", model="all")
    assert sum(r["inference_count"] for r in rollups) == after["total"]["inferences"]


def test_a_small_group_is_withheld_from_viewers_and_shown_to_operators(fleet: Fleet) -> None:
    rng = np.random.default_rng(1)
    bundle_sha256 = publish(fleet, "tiny", "1.0.0")
    raws = make_raw(rng, ["a-1", "a-2", "a-3"], 1)
    up = Uploader(fleet)
    for device, rs in _uploads_in_order(raws):
        up.send(device, [window(r, "tiny", "1.0.0", bundle_sha256) for r in rs])
    params = {"from": DAY0.date().isoformat(), "to": DAY0.date().isoformat()}
    viewer = metrics(fleet, "tiny", "1.0.0", role="viewer", **params)
    assert viewer["total"]["withheld"] == "too few devices (fewer than 5)"
    assert viewer["total"]["inferences"] is None and viewer["total"]["devices_reporting"] is None
    assert all(day["withheld"] for day in viewer["days"])
    operator = metrics(fleet, "tiny", "1.0.0", role="operator", **params)
    assert operator["total"]["withheld"] is None
    assert operator["total"]["devices_reporting"] == 3
    assert operator["total"]["inferences"] == sum(len(r.x0) for r in raws)
    drift = get(fleet, "/v1/models/tiny/versions/1.0.0/drift", "viewer", **params)
    assert drift["drift"]["withheld"] and drift["drift"]["inputs"] is None
    drift = get(fleet, "/v1/models/tiny/versions/1.0.0/drift", "operator", **params)
    assert drift["drift"]["devices_reporting"] == 3 and drift["drift"]["inputs"]


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/models/nope/versions/1.0.0/metrics", {}, 404, "no version 1.0.0 of model nope"),
        ("/v1/models/gait/versions/9.9.9/metrics", {}, 404, "no version 9.9.9"),
        ("/v1/models/gait/versions/1.0.0/metrics", {"from": "yesterday"}, 422, "from"),
        ("/v1/models/gait/versions/1.0.0/metrics", {"to": "2026-13-01"}, 400, "'to' must be"),
        (
            "/v1/models/gait/versions/1.0.0/metrics",
            {"from": "2026-03-05", "to": "2026-03-01"},
            400,
            "must be before",
        ),
        (
            "/v1/models/gait/versions/1.0.0/metrics",
            {"hardware_id": "toaster"},
            400,
            "unknown hardware id",
        ),
        ("/v1/models/gait/versions/1.0.0/metrics", {"by": "week"}, 422, "by"),
        ("/v1/models/gait/versions/1.0.0/drift", {"against": "7.7.7"}, 404, "no version 7.7.7"),
    ],
    ids=["model", "version", "from", "to", "order", "hardware", "by", "against"],
)
def test_bad_queries_are_refused_naming_the_problem(
    fleet: Fleet, path: str, params: dict[str, str], status: int, message: str
) -> None:
    publish(fleet, "gait", "1.0.0")
    r = fleet.client.get(path, params=params, headers=fleet.auth(fleet.token("viewer")))
    assert r.status_code == status, r.text
    assert message in r.text


def test_retention_drops_old_windows_and_keeps_their_rollups(fleet: Fleet) -> None:
    from server import fold, telemetry

    rng = np.random.default_rng(4)
    bundle_sha256 = publish(fleet, "kept", "1.0.0")
    raws = make_raw(rng, [f"r-{i}" for i in range(5)], 3)
    up = Uploader(fleet)
    for device, rs in _uploads_in_order(raws):
        up.send(device, [window(r, "kept", "1.0.0", bundle_sha256) for r in rs])
    params = {"from": DAY0.date().isoformat(), "to": (DAY0 + timedelta(days=2)).date().isoformat()}
    with Session(fleet.state.engine) as session:  # retention drops only folded windows
        fold.fold(session, relative_accuracy=0.01, limit=len(raws))
    before = metrics(fleet, "kept", "1.0.0", **params)
    retention = fleet.state.settings.telemetry_retention_days
    # Past the retention of the first day's windows: that day's are dropped (whole event-time
    # days go, once folded), the rest kept.
    now = DAY0 + timedelta(days=retention + 1, hours=1)
    with Session(fleet.state.engine) as session:
        dropped = telemetry.drop_expired_windows(session, now=now, retention_days=retention)
        left = session.exec(select(func.count()).select_from(TelemetryWindowRecord)).one()
    assert dropped == sum(1 for r in raws if r.start < DAY0 + timedelta(days=1)) > 0
    assert left == len(raws) - dropped
    after = metrics(fleet, "kept", "1.0.0", **params)
    assert after == before  # whole days are read from the rollups, which stay
