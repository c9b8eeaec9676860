"""Shadow rollouts through the app on SQLite and PostgreSQL: what each arm is offered in the
signed set, the flash-budget refusal with the sizes, shadow and data-quality telemetry checked
on ingest (a bad device gets a 4xx, nobody else's figures move), and the evaluator's gates."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from firmware_bundles import telemetry as sketch
from server.arms import in_treatment
from tests.server.conftest import Fleet
from tests.server.test_rollouts import MODEL, bulk_enroll, create, evaluate, manual, two_versions
from tests.server.windows import shadow_counts


def assigned(fleet: Fleet, device: str, cred: str, running: str = "1.0.0") -> dict[str, Any]:
    """The device's entry for the model in its signed assignment set."""
    body = {
        "device_id": device,
        "nonce": uuid.uuid4().hex,
        "firmware_version": "14.0.0",
        "installed": [{"model": MODEL, "version": running}],
    }
    r = fleet.client.post(f"/v1/devices/{device}/check-in", json=body, headers=fleet.auth(cred))
    assert r.status_code == 200, r.text
    [entry] = [b for b in r.json()["signed"]["bundles"] if b["model"] == MODEL]
    return dict(entry)


def test_the_shadow_arm_runs_the_candidate_beside_the_release(fleet: Fleet) -> None:
    shas = two_versions(fleet)
    creds = bulk_enroll(fleet, "sh", 40)
    rollout = create(fleet, stages=manual(50, 100), shadow={"sample_fraction": 0.25})
    assert rollout["shadow"] == {"sample_fraction": 0.25}
    arms = {"treatment": 0, "control": 0}
    for device, cred in creds.items():
        entry = assigned(fleet, device, cred)
        # Every device keeps answering with the release; the standby stays the way back.
        assert (entry["version"], entry["bundle_sha256"]) == ("1.0.0", shas["1.0.0"])
        if in_treatment(rollout["id"], device, 50):
            arms["treatment"] += 1
            assert entry["shadow"] == {
                "version": "2.0.0",
                "bundle_sha256": shas["2.0.0"],
                "bundle_length": entry["shadow"]["bundle_length"],
                "release_counter": 2,
                "download_url": f"/v1/bundles/{shas['2.0.0']}",
                "sample_fraction": 0.25,
            }
        else:
            arms["control"] += 1
            assert "shadow" not in entry  # left out of the bytes, as before shadows existed
    assert arms["treatment"] and arms["control"]
    r = fleet.client.post(
        f"/v1/rollouts/{rollout['id']}/abort", headers=fleet.auth(fleet.token("operator"))
    )
    assert r.status_code == 200, r.text
    for device, cred in list(creds.items())[:10]:
        assert "shadow" not in assigned(fleet, device, cred)  # halted: no shadow anywhere


def test_a_shadow_is_refused_where_the_flash_budget_holds_no_third_slot(fleet: Fleet) -> None:
    for target in ("ring-gen3", "ring-gen4"):
        for counter, version in enumerate(("1.0.0", "2.0.0"), start=1):
            fleet.publish(fleet.bundle(target=target, version=version, counter=counter))
        fleet.release(MODEL, "1.0.0", target)
    catalogue = fleet.state.catalogue
    gen3 = catalogue.get("ring-gen3")
    assert gen3.model_flash_bytes == 2 * gen3.max_bundle_bytes  # two slots fill it
    refused = create(
        fleet, 409, selector={"hardware_ids": ["ring-gen3"]}, shadow={"sample_fraction": 0.1}
    )
    detail = refused["detail"]
    assert "ring-gen3: the shadow slot needs" in detail and "has 0 bytes" in detail
    length = int(detail.split("needs ")[1].split(" bytes")[0])
    assert length > 0
    print(f"\nring-gen3 shadow refused: {detail}")
    # ring-gen4's budget leaves 128 KiB beside its two slots: the small candidate fits, but the
    # ring link carries no shadow candidate yet, so the rollout is refused for that reason.
    gen4 = catalogue.get("ring-gen4")
    assert gen4.shadow_slot_shortfall(length) is None
    link = create(
        fleet, 409, selector={"hardware_ids": ["ring-gen4"]}, shadow={"sample_fraction": 0.1}
    )
    assert link["detail"].startswith("ring-gen4: the flash budget holds a shadow slot, but the")
    assert "device link does not carry shadow candidates" in link["detail"]
    # Too big for the room: the figures in the refusal are the target's.
    room = gen4.model_flash_bytes - 2 * gen4.max_bundle_bytes
    assert gen4.shadow_slot_shortfall(room + 1) == (room + 1, room)


def test_a_shadow_needs_a_release_to_run_beside(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(version="2.0.0", counter=2))
    refused = create(fleet, 409, shadow={"sample_fraction": 0.5})
    assert "runs beside the released version" in refused["detail"]
    assert create(fleet, 422, shadow={"sample_fraction": 1.5})


def _window(device: str, sha: str, start: str, n: int = 100, **extra: Any) -> dict[str, Any]:
    latency = sketch.new_sketch(0.01)
    sketch.add(latency, 0.002, n)
    return {
        "device_id": device,
        "model": MODEL,
        "version": "1.0.0",
        "bundle_sha256": sha,
        "window_start": start,
        "window_s": 3600,
        "inference_count": n,
        "latency": latency,
        "outputs": [{"name": "label", "counts": [n // 2, n - n // 2, 0]}],
        "inputs": [{"name": "x0", "counts": [3, n - 8, 5]}],
        **extra,
    }


def _shadow(sha: str, compared: int, agreed: int, **changes: Any) -> dict[str, Any]:
    entry = {"version": "2.0.0", "bundle_sha256": sha, **shadow_counts(compared, agreed)}
    return {**entry, **changes}


def _upload(fleet: Fleet, device: str, cred: str, windows: list[dict[str, Any]], seq: int) -> Any:
    batch = {"device_id": device, "boot_epoch": 1, "sequence": seq, "windows": windows}
    return fleet.client.post(
        f"/v1/devices/{device}/telemetry", json=batch, headers=fleet.auth(cred)
    )


BAD = [
    ({"shadow": [{"bundle_sha256": "ab" * 32}]}, "is not published on this server"),
    ({"shadow": [{"version": "9.9.9"}]}, "names wrist-activity 9.9.9, but the bundle is"),
    ({"shadow": [{"agreed": 11}]}, "agreed must not exceed compared"),
    ({"shadow": [{"sampled": 5}]}, "must not exceed sampled"),
    ({"shadow": [{"compared": -1}]}, "greater than or equal to 0"),
    ({"shadow": [{"latency": "old"}]}, "latency"),
    ({"quality": {"missing": {"nope": 3}}}, "no input histogram 'nope'"),
    ({"quality": {"refused": {"nope": 1}}}, "'nope' is not an input of the model"),
    ({"quality": {"refused": {"features": 1}}}, "but error_count is 0"),
    ({"quality": {"missing": {"x0": 1.5}}}, "valid integer"),
]


@pytest.mark.parametrize(
    ("change", "words"),
    BAD,
    ids=[
        "unpublished-candidate",
        "candidate-version-mismatch",
        "agreed-over-compared",
        "over-sampled",
        "negative-count",
        "bad-sketch",
        "unknown-feature",
        "unknown-input",
        "refused-without-errors",
        "fractional-count",
    ],
)
def test_bad_shadow_or_quality_telemetry_is_refused_and_hurts_nobody(
    fleet: Fleet, change: dict[str, Any], words: str
) -> None:
    shas = two_versions(fleet)
    good, bad = fleet.enroll("phone-good"), fleet.enroll("phone-bad")
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    at = start.isoformat()
    fine = _window(
        "phone-good",
        shas["1.0.0"],
        at,
        shadow=[_shadow(shas["2.0.0"], 10, 7)],
        quality={"missing": {"x0": 4}},
    )
    assert _upload(fleet, "phone-good", good, [fine], 0).status_code == 200
    field, value = next(iter(change.items()))
    window = _window("phone-bad", shas["1.0.0"], at)
    if field == "shadow":
        window["shadow"] = [{**_shadow(shas["2.0.0"], 10, 7), **value[0]}]
    else:
        window["quality"] = value
    r = _upload(fleet, "phone-bad", bad, [window], 0)
    assert 400 <= r.status_code < 500 and words in r.text, r.text
    figures = fleet.client.get(
        f"/v1/models/{MODEL}/versions/1.0.0/metrics",
        params={"by": "none"},
        headers=fleet.auth(fleet.token("operator")),
    ).json()["total"]
    assert figures["inferences"] == 100  # the good device's alone
    [row] = figures["shadow"]
    assert (row["candidate_version"], row["compared"], row["agreed"]) == ("2.0.0", 10, 7)
    [x0] = figures["data_quality"]["features"]
    assert (x0["missing"], x0["out_of_range"], x0["values"]) == (4, 8, 104)


def test_the_evaluator_judges_a_shadow_on_its_agreement(fleet: Fleet) -> None:
    shas = two_versions(fleet)
    creds = bulk_enroll(fleet, "ev", 24)
    gates = {"min_devices_per_arm": 10, "min_inferences_per_arm": 100}
    stages = [{"percent": 50, "min_duration_s": 0, "min_devices": 1, "min_inferences": 10}]
    rollout = create(
        fleet,
        stages=[*stages, {"percent": 100}],
        gates={**gates, "shadow_agreement": {"min_agreement": 0.9, "min_compared": 200}},
        shadow={"sample_fraction": 0.2},
        on_failure="halt",
    )
    start = datetime.now(UTC).isoformat()  # after the rollout started: its evidence
    for seq, (device, cred) in enumerate(creds.items()):
        treated = in_treatment(rollout["id"], device, 50)
        # The candidate agrees on half the calls: far under 0.9.
        shadow = [_shadow(shas["2.0.0"], 40, 20)] if treated else []
        window = _window(device, shas["1.0.0"], start, n=200, shadow=shadow)
        assert _upload(fleet, device, cred, [window], seq).status_code == 200, seq
    decision = evaluate(fleet, rollout["id"])
    gates_by_name = {g["gate"]: g for g in decision["figures"]["verdict"]["gates"]}
    agreement = gates_by_name["shadow_agreement"]
    assert agreement["status"] == "fail", agreement
    assert agreement["estimate"] == pytest.approx(0.5)
    assert "install" not in gates_by_name  # the treatment installs nothing in a shadow
    assert decision["action"] == "halt" and decision["state_after"] == "halted"
