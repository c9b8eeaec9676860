"""Schemathesis against a real server process, with every check (server errors, status codes,
content types, headers, response-schema conformance, negative and positive data, ...), for admin
and device credentials, on SQLite and on PostgreSQL, at least 50 examples per operation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import CAPS
from tests.server.test_real_process import free_port

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_server_errors_for_admin_or_device(database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "db",
            "upgrade",
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
        ],
        check=True,
        capture_output=True,
    )
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
            str(data_dir),
            "--database-url",
            database_url,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        admin = re.search(r"efa_[A-Za-z0-9_-]+", log.read_text())
        assert admin, log.read_text()
        headers = {"Authorization": f"Bearer {admin.group(0)}"}
        enroll = httpx.post(f"{url}/v1/enrollment-tokens", json={}, headers=headers).json()
        device = httpx.post(
            f"{url}/v1/devices/enroll",
            json={
                "enroll_token": enroll["token"],
                "device_id": "fuzz-phone",
                "capabilities": CAPS["phone-android"],
            },
        ).json()["credential"]
        for token in (admin.group(0), device):
            result = subprocess.run(
                [
                    str(SCHEMATHESIS),
                    "--config-file",
                    str(Path(__file__).with_name("schemathesis.toml")),
                    "run",
                    f"{url}/openapi.json",
                    "-H",
                    f"Authorization: Bearer {token}",
                    "-n",
                    "50",
                    "--checks",
                    "all",
                    "--generation-deterministic",
                    "--workers",
                    "1",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "NO_COLOR": "1"},
                timeout=600,
            )
            summary = result.stdout[-3000:]
            assert result.returncode == 0, summary
            assert re.search(r"\d+ generated, \d+ passed", summary), summary
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if "Traceback" in log.read_text():
        pytest.fail("server logged a traceback:\n" + log.read_text()[-3000:])
