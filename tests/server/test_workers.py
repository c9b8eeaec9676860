"""`edgefleet serve --workers N`: several processes on one port and one PostgreSQL database, each
dropping its offer cache when another commits a change (server.invalidation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from firmware_bundles import build
from tests.conftest import MODEL_BYTES, manifest_draft
from tests.procs import ServerProcess, cli
from tests.server.conftest import CAPS


def test_serve_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    refused = cli("serve", "--init", "--data-dir", str(tmp_path / "data"), "--workers", "2")
    assert refused.returncode == 2
    assert "--workers 2 needs PostgreSQL" in refused.stderr + refused.stdout


@pytest.fixture()
def two_workers(pg_database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    upgraded = cli("db", "upgrade", "--data-dir", str(data_dir), "--database-url", pg_database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    (tmp_path / "logs").mkdir()
    server = ServerProcess(
        data_dir=data_dir,
        log_dir=tmp_path / "logs",
        serve_args=("--database-url", pg_database_url, "--workers", "2", "--log-level", "info"),
        # Only the notification can make a worker see another's change within the test.
        env={"EDGEFLEET_RELEASE_CACHE_TTL_S": "3600"},
    )
    try:
        yield server.start()
    finally:
        server.stop()


def _check_ins_from_each_worker(server: ServerProcess, credential: str) -> list[list[str]]:
    """Check in on fresh connections until both workers have answered (the kernel hands each
    connection to one of them); the offered bundle SHA-256s of each answer."""
    seen: list[list[str]] = []
    before = len(server.requests())
    for _ in range(200):
        with httpx.Client() as client:  # a new connection each time
            answer = server.check_in(client, "phone-1", credential)
        assert answer.status_code == 200, answer.text
        seen.append([b["bundle_sha256"] for b in answer.json()["signed"]["bundles"]])
        pids = {r["pid"] for r in server.requests()[before:] if r["path"].endswith("/check-in")}
        if len(pids) == 2:
            return seen
    raise AssertionError("200 check-ins never reached the second worker")


def test_two_workers_answer_on_one_port_and_see_each_others_changes(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    server = two_workers
    credential = server.enroll("phone-1", CAPS["phone-android"])
    # Both workers cache "nothing released for phone-android" (for an hour, as configured).
    assert all(offered == [] for offered in _check_ins_from_each_worker(server, credential))

    bundle = tmp_path / "b.efb"
    bundle.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [server.release_key]))
    bundle_sha256 = server.publish_and_release(bundle, "wrist-activity", "1.2.3")

    # One worker committed the release; the other heard of it and dropped its cache.
    after = _check_ins_from_each_worker(server, credential)
    assert all(offered == [bundle_sha256] for offered in after), after
