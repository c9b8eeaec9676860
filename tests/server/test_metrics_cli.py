"""`edgefleet metrics` and `edgefleet drift` against a real `edgefleet serve` over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np

from firmware_bundles import SigningKey, build
from tests.conftest import MODEL_BYTES
from tests.server.conftest import CAPS
from tests.server.test_metrics import CLASSES, DAY0, EDGES, bins, make_raw, window
from tests.server.test_real_process import server  # noqa: F401  (the fixture)


def cli(*args: str, url: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args, "--server", url, "--token", token],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "160"},
    )


def _draft() -> dict:
    from tests.conftest import manifest_draft

    draft = manifest_draft(name="gait", version="1.0.0", release_counter=1)
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


def test_metrics_and_drift_commands(server: tuple[str, str, Path, Path], tmp_path: Path) -> None:  # noqa: F811
    url, admin, data_dir, _ = server
    release_key = SigningKey.from_pem((data_dir / "keys" / "release.pem").read_bytes())
    bundle = tmp_path / "gait.efb"
    bundle.write_bytes(build(_draft(), {"model.onnx": MODEL_BYTES}, [release_key]))
    published = cli("publish", str(bundle), "--json", url=url, token=admin)
    assert published.returncode == 0, published.stderr
    sha = json.loads(published.stdout)[0]["sha256"]
    enroll = json.loads(
        cli("tokens", "enroll", "--max-uses", "10", "--json", url=url, token=admin).stdout
    )
    raws = make_raw(np.random.default_rng(2), [f"p-{i}" for i in range(5)], 2)
    for i in range(5):
        device = f"p-{i}"
        r = httpx.post(
            f"{url}/v1/devices/enroll",
            json={
                "enroll_token": enroll["token"],
                "device_id": device,
                "capabilities": CAPS["phone-android"],
            },
        )
        assert r.status_code == 201, r.text
        windows = [window(w, "gait", "1.0.0", sha) for w in raws if w.device == device]
        r = httpx.post(
            f"{url}/v1/devices/{device}/telemetry",
            headers={"Authorization": f"Bearer {r.json()['credential']}"},
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
    done = cli("metrics", "gait", "1.0.0", *span, "--json", url=url, token=admin)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["total"]["inferences"] == sum(len(w.x0) for w in raws)
    assert [d["day"] for d in answer["days"]] == ["2026-03-02", "2026-03-03"]
    table = cli("metrics", "gait", "1.0.0", *span, url=url, token=admin)
    assert table.returncode == 0 and "total" in table.stdout and "2026-03-03" in table.stdout
    done = cli("drift", "gait", "1.0.0", *span, "--json", url=url, token=admin)
    assert done.returncode == 0, done.stderr
    [feature] = json.loads(done.stdout)["drift"]["inputs"]
    assert feature["counts"] == bins(np.concatenate([w.x0 for w in raws]))
    table = cli("drift", "gait", "1.0.0", *span, url=url, token=admin)
    assert table.returncode == 0 and "x0" in table.stdout and "PSI" in table.stdout
    bad = cli("metrics", "gait", "1.0.0", "--from", "2026-02-30", url=url, token=admin)
    assert bad.returncode == 1 and "'from' must be an ISO 8601 date or time" in bad.stderr
    unknown = cli("drift", "gait", "2.0.0", url=url, token=admin)
    assert unknown.returncode == 1 and "no version 2.0.0 of model gait" in unknown.stderr
