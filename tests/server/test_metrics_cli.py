"""`edgefleet metrics` and `edgefleet drift` against a real `edgefleet serve` over HTTP."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np

from firmware_bundles import build
from tests.conftest import MODEL_BYTES
from tests.procs import ServerProcess
from tests.server.conftest import CAPS
from tests.server.test_metrics import DAY0, bins, draft, make_raw, window


def test_metrics_and_drift_commands(server: ServerProcess, tmp_path: Path) -> None:
    bundle = tmp_path / "gait.efb"
    data = build(draft("gait", "1.0.0"), {"model.onnx": MODEL_BYTES}, [server.release_key])
    bundle.write_bytes(data)
    bundle_sha256 = server.publish(bundle)
    raws = make_raw(np.random.default_rng(2), [f"p-{i}" for i in range(5)], 2)
    for i in range(5):
        device = f"p-{i}"
        credential = server.enroll(device, CAPS["phone-android"])
        windows = [window(w, "gait", "1.0.0", bundle_sha256) for w in raws if w.device == device]
        r = httpx.post(
            f"{server.url}/v1/devices/{device}/telemetry",
            headers={"Authorization": f"Bearer {credential}"},
            content=json.dumps(
                {"device_id": device, "boot_epoch": 1, "sequence": 0, "windows": windows}
            ),
        )
        assert r.status_code == 200, r.text
    span = [
        "--from",
        DAY0.date().isoformat(),
        "--to",
        (DAY0 + timedelta(days=1)).date().isoformat(),
    ]
    done = server.cli("metrics", "gait", "1.0.0", *span, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["total"]["inferences"] == sum(len(w.x0) for w in raws)
    assert [d["day"] for d in answer["days"]] == ["2026-03-02", "2026-03-03"]
    table = server.cli("metrics", "gait", "1.0.0", *span)
    assert table.returncode == 0 and "total" in table.stdout and "2026-03-03" in table.stdout
    done = server.cli("drift", "gait", "1.0.0", *span, "--json")
    assert done.returncode == 0, done.stderr
    [feature] = json.loads(done.stdout)["drift"]["inputs"]
    assert feature["counts"] == bins(np.concatenate([w.x0 for w in raws]))
    table = server.cli("drift", "gait", "1.0.0", *span)
    assert table.returncode == 0 and "x0" in table.stdout and "PSI" in table.stdout
    bad = server.cli("metrics", "gait", "1.0.0", "--from", "2026-02-30")
    assert bad.returncode == 1 and "'from' must be an ISO 8601 date or time" in bad.stderr
    unknown = server.cli("drift", "gait", "2.0.0")
    assert unknown.returncode == 1 and "no version 2.0.0 of model gait" in unknown.stderr
