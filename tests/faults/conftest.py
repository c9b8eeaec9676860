"""The fault suite: real server processes on a private PostgreSQL cluster (tests/pg_cluster.py),
which the tests crash and restart."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_cluster import PrivateCluster
from tests.procs import ServerProcess, cli


@pytest.fixture()
def cluster() -> Iterator[PrivateCluster]:
    # Not under tmp_path: pytest's folders are the test user's alone, and as root the cluster
    # runs as the postgres user, who must reach its directory.
    made = PrivateCluster(Path(tempfile.mkdtemp(prefix="edgefleet-pg-")))
    try:
        yield made.create()
    finally:
        made.destroy()


def fleet_server(
    cluster: PrivateCluster, tmp_path: Path, *, workers: int = 1, env: dict[str, str] | None = None
) -> ServerProcess:
    """`edgefleet serve` (not started) on ``cluster``'s migrated database."""
    data_dir = tmp_path / "data"
    upgraded = cli("db", "upgrade", "--data-dir", str(data_dir), "--database-url", cluster.url())
    assert upgraded.returncode == 0, upgraded.stderr
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    return ServerProcess(
        data_dir=data_dir,
        log_dir=log_dir,
        serve_args=("--database-url", cluster.url(), "--workers", str(workers)),
        env=env or {},
    )
