"""A server process killed while it holds the rollout evaluator's lease: another takes over."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from tests.faults.conftest import fleet_server
from tests.pg_cluster import PrivateCluster
from tests.procs import wait_for


def _holder(cluster: PrivateCluster) -> tuple[int, datetime] | None:
    """The pid holding the evaluator's lease and when the lease expires, if anyone holds it."""
    with psycopg.connect(cluster.url().replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT holder, expires_at FROM job_lock WHERE name = 'rollout-evaluator'"
        ).fetchone()
    if row is None:
        return None
    expires = row[1] if row[1].tzinfo else row[1].replace(tzinfo=UTC)
    return int(row[0].split(":")[1]), expires


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed worker its parent has not reaped yet (a zombie, state
    ``Z``, which ``kill(pid, 0)`` still finds) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_a_worker_killed_holding_the_evaluator_lease_is_taken_over(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    # The evaluator runs every second under a 3-second lease.
    server = fleet_server(
        cluster, tmp_path, workers=2, env={"EDGEFLEET_ROLLOUT_EVALUATION_S": "1"}
    ).start()
    try:
        held = wait_for(lambda: _holder(cluster), "a worker to take the lease", timeout_s=60)
        killed = held[0]
        assert _alive(killed)
        os.kill(killed, signal.SIGKILL)

        def taken_over() -> tuple[int, datetime] | None:
            now = _holder(cluster)
            if now is None or now[0] == killed or now[1] <= datetime.now(UTC):
                return None
            return now

        holder, _ = wait_for(taken_over, "another process to take the lease", timeout_s=60)
        assert holder != killed and _alive(holder) and not _alive(killed)
        # The port still answers (the survivor, and the worker uvicorn started in its place).
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
