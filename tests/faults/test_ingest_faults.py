"""Telemetry through faults: PostgreSQL restarted, and the server SIGKILLed while devices upload
and while its fold job adds their windows into rollups.

Each device keeps its batches in the agent's own outbox and drains it with the agent's own upload
loop (device_agent.telemetry_upload), retrying what failed. After each fault the server's totals
must equal the sum of what the devices recorded: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

from device_agent.client import FleetClient
from device_agent.errors import ServerRejected, ServerUnreachable
from device_agent.outbox import Outbox
from device_agent.telemetry_upload import upload_pending
from firmware_bundles import build
from firmware_bundles import telemetry as sketch
from firmware_bundles.messages import TelemetryBatch
from tests.conftest import MODEL_BYTES, manifest_draft
from tests.faults.conftest import fleet_server
from tests.pg_cluster import PrivateCluster
from tests.procs import ServerProcess, wait_for
from tests.server.conftest import CAPS

DEVICES = 8
BATCHES = 12
WINDOWS = 4
MODEL, VERSION = "wrist-activity", "1.2.3"


@dataclass
class Device:
    device_id: str
    credential: str
    outbox: Outbox
    inferences: int = 0
    errors: int = 0


def _fill(device: Device, bundle_sha256: str, rng: np.random.Generator) -> None:
    """The device's recorded windows, as batches in its outbox (hourly, over the last days)."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    for seq in range(BATCHES):
        windows = []
        for w in range(WINDOWS):
            n, errors = int(rng.integers(1, 40)), int(rng.integers(0, 3))
            latency = sketch.new_sketch()
            for value in rng.lognormal(-6, 0.5, n):
                sketch.add(latency, float(value))
            windows.append(
                {
                    "device_id": device.device_id,
                    "model": MODEL,
                    "version": VERSION,
                    "bundle_sha256": bundle_sha256,
                    "window_start": (start + timedelta(hours=seq * WINDOWS + w)).isoformat(),
                    "window_s": 3600,
                    "inference_count": n,
                    "error_count": errors,
                    "latency": latency,
                    "outputs": [
                        {"name": "label", "counts": rng.multinomial(n, [0.5, 0.5, 0.0]).tolist()}
                    ],
                    "inputs": [
                        {"name": "x0", "counts": rng.multinomial(n, [0.2, 0.5, 0.3]).tolist()}
                    ],
                }
            )
            device.inferences += n
            device.errors += errors
        batch = {
            "device_id": device.device_id,
            "boot_epoch": 1,
            "sequence": seq,
            "windows": windows,
        }
        device.outbox.put_relayed(TelemetryBatch.from_dict(batch))


def _fleet(server: ServerProcess, tmp_path: Path) -> list[Device]:
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [server.release_key]))
    bundle_sha256 = server.publish_and_release(bundle, MODEL, VERSION)
    rng = np.random.default_rng(11)
    devices = []
    for i in range(DEVICES):
        device_id = f"phone-{i}"
        credential = server.enroll(device_id, CAPS["phone-android"])
        device = Device(device_id, credential, Outbox(tmp_path / f"outbox-{i}.db", 10**8))
        _fill(device, bundle_sha256, rng)
        devices.append(device)
    return devices


class Uploaders:
    """Every device draining its outbox one batch at a time, retrying through failures."""

    def __init__(self, server: ServerProcess, devices: list[Device], state_dir: Path) -> None:
        self.devices = devices
        self.accepted = 0
        self.failures = 0
        self._http = httpx.Client()
        self._client = FleetClient(self._http, server.url, state_dir, timeout_s=5)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pending(self) -> int:
        return sum(int(d.outbox.stats()["pending_batches"]) for d in self.devices)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while self.pending() and time.monotonic() < deadline:
            for device in self.devices:
                try:
                    sent = upload_pending(
                        device.outbox,
                        self._client,
                        device.device_id,
                        device.credential,
                        batch_windows=WINDOWS,
                        max_batches=1,
                    )
                    self.accepted += sent.batches_sent
                except (ServerUnreachable, ServerRejected):
                    self.failures += 1  # 5xx or no answer: the batch stays for the next try
                    time.sleep(0.05)
                time.sleep(0.01)

    def __enter__(self) -> Uploaders:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join(330)
        self._http.close()

    def wait_accepted(self, count: int) -> None:
        wait_for(lambda: self.accepted >= count, f"{count} batches accepted", timeout_s=120)


def _totals(server: ServerProcess) -> tuple[int, int]:
    start = (datetime.now(UTC) - timedelta(days=10)).date().isoformat()
    end = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    figures = server.api(
        "GET", f"/v1/models/{MODEL}/versions/{VERSION}/metrics?from={start}&to={end}&by=none"
    )["total"]
    return int(figures["inferences"]), int(figures["errors"])


def _through(fault: Callable[[ServerProcess, PrivateCluster], None], cluster: PrivateCluster,
             tmp_path: Path, env: dict[str, str] | None = None
             ) -> tuple[ServerProcess, list[Device]]:  # fmt: skip
    """Devices upload through ``fault``; the server's totals then equal what they recorded.
    Returns the server (stopped) and the devices."""
    server = fleet_server(cluster, tmp_path, env=env).start()
    try:
        devices = _fleet(server, tmp_path)
        with Uploaders(server, devices, tmp_path) as uploads:
            uploads.wait_accepted(DEVICES * BATCHES // 4)
            fault(server, cluster)
        assert uploads.pending() == 0, f"{uploads.pending()} batches never accepted"
        assert uploads.failures > 0, "the fault never reached an upload"
        recorded = (sum(d.inferences for d in devices), sum(d.errors for d in devices))
        assert _totals(server) == recorded
    finally:
        server.stop()
    return server, devices


def test_postgresql_restarted_mid_ingest_loses_and_doubles_nothing(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    def restart_database(_: ServerProcess, db: PrivateCluster) -> None:
        db.stop("immediate")  # a crash: clients cut off mid-transaction
        time.sleep(2)
        db.start()

    _through(restart_database, cluster, tmp_path)


def test_server_sigkilled_mid_ingest_loses_and_doubles_nothing(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    def kill_server(server: ServerProcess, _: PrivateCluster) -> None:
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        time.sleep(1)
        server.start()  # same data and port; the uploads resume against it

    _through(kill_server, cluster, tmp_path)


def _windows(db: sa.Engine) -> tuple[int, int]:
    """Windows stored: folded into their rollups, and waiting."""
    with db.connect() as conn:
        folded, waiting = conn.execute(
            sa.text("SELECT count(*) FILTER (WHERE folded), count(*) FILTER (WHERE NOT folded)"
                    " FROM telemetry_window")
        ).one()  # fmt: skip
    return int(folded), int(waiting)


def _rollup_sums(db: sa.Engine) -> dict[str, tuple[int, int, int]]:
    """Inferences, errors and windows added up in the devices' rollups and in the fleet's."""
    found = {}
    with db.connect() as conn:
        for table in ("telemetry_rollup", "telemetry_fleet_rollup"):
            row = conn.execute(
                sa.text(f"SELECT coalesce(sum(inference_count), 0), coalesce(sum(error_count), 0),"
                        f" coalesce(sum(window_count), 0) FROM {table}")
            ).one()  # fmt: skip
            found[table] = (int(row[0]), int(row[1]), int(row[2]))
    return found


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (the fold's child among them), from /proc (listed per
    thread: the fold's child is started from a job's thread)."""
    return [
        int(child)
        for listed in Path(f"/proc/{pid}/task").glob("*/children")
        for child in listed.read_text().split()
    ]


def test_server_sigkilled_mid_fold_loses_and_doubles_nothing(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    # One window a fold transaction, folds back to back: the kill lands inside a fold's
    # transaction while windows still wait (checked below), which PostgreSQL rolls back whole.
    # The fold runs in the server's child process (server/fold_worker.py): both are killed, as
    # a crash of their host or container would.
    # The killed child's lease (a round of one window is short) lapses after 5 s, not 60.
    env = {
        "EDGEFLEET_TELEMETRY_FOLD_S": "0.05",
        "EDGEFLEET_TELEMETRY_FOLD_MAX_WINDOWS": "1",
        "EDGEFLEET_TELEMETRY_FOLD_LEASE_S": "5",
    }
    db = sa.create_engine(cluster.url())
    seen: dict[str, tuple[int, int]] = {}

    def kill_server_mid_fold(server: ServerProcess, _: PrivateCluster) -> None:
        wait_for(lambda: min(_windows(db)) > 0, "windows both folded and waiting", timeout_s=60)
        assert server.proc is not None
        children = _children(server.proc.pid)
        assert children, "the fold's child process was not running"
        server.proc.kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        server.proc.wait(10)
        seen["killed"] = _windows(db)
        time.sleep(1)
        server.start()

    try:
        server, devices = _through(kill_server_mid_fold, cluster, tmp_path, env)
        folded, waiting = seen["killed"]
        assert folded > 0 and waiting > 0, seen
        # The server stopped with windows perhaps still waiting: start it again to fold them all.
        server.start()
        try:
            wait_for(lambda: _windows(db)[1] == 0, "every window folded", timeout_s=120)
            recorded = (
                sum(d.inferences for d in devices),
                sum(d.errors for d in devices),
                DEVICES * BATCHES * WINDOWS,
            )
            assert _windows(db) == (DEVICES * BATCHES * WINDOWS, 0)
            sums = _rollup_sums(db)
            assert sums["telemetry_rollup"] == recorded, sums
            assert sums["telemetry_fleet_rollup"] == recorded, sums
            assert _totals(server) == recorded[:2]
        finally:
            server.stop()
    finally:
        db.dispose()
