"""Schemathesis against a real server process, with every check (server errors, status codes,
content types, headers, response-schema conformance, negative and positive data, ...), for admin
and device credentials, on SQLite and on PostgreSQL, at least 50 examples per operation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ServerProcess, cli
from tests.server.conftest import CAPS

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_server_errors_for_admin_or_device(database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    upgraded = cli("db", "upgrade", "--data-dir", str(data_dir), "--database-url", database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    server = ServerProcess(
        data_dir=data_dir,
        log_dir=tmp_path,
        serve_args=("--database-url", database_url, "--log-level", "warning"),
        # Webhooks the fuzzer subscribes may only ever be delivered to loopback.
        env={"EDGEFLEET_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]'},
    )
    try:
        server.start()
        device = server.enroll("fuzz-phone", CAPS["phone-android"])
        url = server.url
        for token in (server.admin_token, device):
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
        server.stop()
    log = server.logs[0].read_text()
    if "Traceback" in log:
        pytest.fail("server logged a traceback:\n" + log[-3000:])
