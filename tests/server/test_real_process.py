"""The server as a user runs it: `edgefleet serve --init` (uvicorn on loopback), the CLI clients,
and a device over real HTTP."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx

from firmware_bundles import SigningKey, build
from tests.conftest import MODEL_BYTES, format_3, manifest_draft
from tests.procs import ServerProcess
from tests.server.conftest import CAPS


def test_publish_release_check_in_and_download_over_http(
    server: ServerProcess, tmp_path: Path
) -> None:
    url = server.url
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [server.release_key]))
    bundle_sha256 = server.publish(bundle)
    assert server.cli("release", "wrist-activity", "1.2.3").returncode == 0
    models = json.loads(server.cli("models", "list", "--json").stdout)
    assert models[0]["versions"][0]["released_for"] == ["phone-android"]

    bad = tmp_path / "bad.efb"
    bad.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [SigningKey.generate()]))
    refused = server.cli("publish", str(bad))
    assert refused.returncode == 1 and "unknown key" in refused.stderr

    credential = server.enroll("phone-9", CAPS["phone-android"])
    headers = {"Authorization": f"Bearer {credential}"}
    r = httpx.post(
        f"{url}/v1/devices/phone-9/check-in",
        headers=headers,
        json={"device_id": "phone-9", "nonce": uuid.uuid4().hex, "firmware_version": "14.0.0"},
    )
    assignment = r.json()["signed"]["bundles"][0]
    assert assignment["bundle_sha256"] == bundle_sha256
    part = httpx.get(
        f"{url}{assignment['download_url']}", headers={**headers, "Range": "bytes=1000-"}
    )
    assert part.status_code == 206 and part.content == bundle.read_bytes()[1000:]
    devices = json.loads(server.cli("devices", "list", "--json").stdout)
    assert devices[0]["id"] == "phone-9" and devices[0]["last_seen"]
    # Structured logs: one JSON line per request, with the Range header.
    lines = server.requests()
    assert any(x["range"] == "bytes=1000-" and x["status"] == 206 for x in lines)


def test_second_start_prints_no_admin_token(server: ServerProcess, tmp_path: Path) -> None:
    assert "admin token" in server.logs[0].read_text()
    (tmp_path / "second").mkdir()
    second = ServerProcess(
        data_dir=server.data_dir,
        log_dir=tmp_path / "second",
        admin_token=server.admin_token,
        init=False,
    )
    try:
        second.start()
        r = httpx.get(
            f"{second.url}/v1/tokens", headers={"Authorization": f"Bearer {server.admin_token}"}
        )
        assert r.status_code == 200  # the first start's token still works
        assert "admin token" not in second.logs[0].read_text()
    finally:
        second.stop()


def test_publish_uploads_a_detached_reference_beside_its_bundle(
    server: ServerProcess, tmp_path: Path
) -> None:
    draft, files, reference = format_3(
        manifest_draft(name="ring-model"), {"model.onnx": MODEL_BYTES}, detached=True
    )
    bundle = tmp_path / "ring-model-1.2.3-phone-android.efb"
    bundle.write_bytes(build(draft, files, [server.release_key]))
    # Without its reference file beside it, nothing is published and the file is named.
    refused = server.cli("publish", str(bundle))
    assert (
        refused.returncode == 1 and "ring-model-1.2.3-phone-android.reference.bin" in refused.stderr
    )
    assert json.loads(server.cli("models", "list", "--json").stdout) == []
    (tmp_path / "ring-model-1.2.3-phone-android.reference.bin").write_bytes(reference)
    published = server.cli("publish", str(bundle), "--json")
    assert published.returncode == 0, published.stderr
    [result] = json.loads(published.stdout)
    assert result["reference"] == {
        "sha256": result["sha256"],
        "target_id": "phone-android",
        "inputs": 1,
        "outputs": 1,
    }
