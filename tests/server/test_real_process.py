"""The server as a user runs it: `edgefleet serve --init` (uvicorn on loopback), the CLI clients,
and a device over real HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from firmware_bundles import SigningKey, build
from tests.conftest import MODEL_BYTES, manifest_draft
from tests.server.conftest import CAPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, str, Path, Path]]:
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "serve",
            "--init",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            str(port),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start: " + log.read_text())
        token = re.search(r"efa_[A-Za-z0-9_-]+", log.read_text())
        assert token, log.read_text()
        yield url, token.group(0), tmp_path / "data", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cli(*args: str, url: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args, "--server", url, "--token", token],
        capture_output=True,
        text=True,
        check=False,
    )


def test_publish_release_check_in_and_download_over_http(
    server: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    url, admin, data_dir, log = server
    release_key = SigningKey.from_pem((data_dir / "keys" / "release.pem").read_bytes())
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [release_key]))
    published = cli("publish", str(bundle), "--json", url=url, token=admin)
    assert published.returncode == 0, published.stderr
    sha = json.loads(published.stdout)[0]["sha256"]
    assert cli("release", "wrist-activity", "1.2.3", url=url, token=admin).returncode == 0
    models = json.loads(cli("models", "list", "--json", url=url, token=admin).stdout)
    assert models[0]["versions"][0]["released_for"] == ["phone-android"]

    bad = tmp_path / "bad.efb"
    bad.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [SigningKey.generate()]))
    refused = cli("publish", str(bad), url=url, token=admin)
    assert refused.returncode == 1 and "unknown key" in refused.stderr

    enroll_token = json.loads(cli("tokens", "enroll", "--json", url=url, token=admin).stdout)
    r = httpx.post(
        f"{url}/v1/devices/enroll",
        json={
            "enroll_token": enroll_token["token"],
            "device_id": "phone-9",
            "capabilities": CAPS["phone-android"],
        },
    )
    credential = r.json()["credential"]
    headers = {"Authorization": f"Bearer {credential}"}
    r = httpx.post(
        f"{url}/v1/devices/phone-9/check-in",
        headers=headers,
        json={"device_id": "phone-9", "nonce": uuid.uuid4().hex, "firmware_version": "14.0.0"},
    )
    assignment = r.json()["signed"]["bundles"][0]
    assert assignment["bundle_sha256"] == sha
    part = httpx.get(
        f"{url}{assignment['download_url']}", headers={**headers, "Range": "bytes=1000-"}
    )
    assert part.status_code == 206 and part.content == bundle.read_bytes()[1000:]
    devices = json.loads(cli("devices", "list", "--json", url=url, token=admin).stdout)
    assert devices[0]["id"] == "phone-9" and devices[0]["last_seen"]
    # Structured logs: one JSON line per request, with the Range header.
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(x["range"] == "bytes=1000-" and x["status"] == 206 for x in lines)


def test_second_start_prints_no_admin_token(
    server: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    _, admin, data_dir, first_log = server
    assert "admin token" in first_log.read_text()
    port = free_port()
    log = tmp_path / "second.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/tokens", headers={"Authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 200  # the first start's token still works
        assert "admin token" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
