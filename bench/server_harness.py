"""What the server benches share: a free port, waiting for /healthz, seeding a fleet straight into
the database, driving wrk, and bench/bare_app.py's baseline endpoints.

Imported by bench_server.py, load_fleet.py and bench_dashboard.py (each puts the repository on
``sys.path`` first).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from firmware_bundles import SigningKey, build
from server.auth import hash_token
from server.db import upgrade
from tests.conftest import MODEL_BYTES, manifest_draft

REPO = Path(__file__).resolve().parent.parent

PG = os.environ.get(
    "EDGEFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str) -> None:
    for _ in range(200):
        try:
            httpx.get(url + "/healthz", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not start")


#: The API token the bench publishes with (its hash is seeded into the database).
PUBLISHER_TOKEN = "efa_bench_publisher"


def seed(url: str, data_dir: Path, devices: int, models: int, assigned: int) -> Path:
    """Publish and release ``models`` models, enroll ``devices`` devices straight into the DB."""
    from sqlalchemy import insert
    from sqlmodel import Session

    from firmware_bundles.messages import InstalledModel
    from server.app import build_state
    from server.config import Settings
    from server.device_events import state_hash
    from server.models import ApiToken, Device, DeviceState
    from server.registry import publish_bytes, release

    upgrade(url)
    state = build_state(Settings(data_dir=data_dir, database_url=url))
    key = SigningKey.from_pem((data_dir / "keys" / "release.pem").read_bytes())
    installed = []
    with Session(state.engine) as session:
        for m in range(models):
            name = f"m{m:02d}"
            hardware_id = "phone-android" if m < assigned else "devboard-rpi4"
            platform = (
                ("phone", "android", "10.0.0") if m < assigned else ("devboard", "rpi4", "1.0.0")
            )
            draft = manifest_draft(
                name=name,
                targets=[
                    {
                        "target_id": hardware_id,
                        "generation": platform[0],
                        "platform": platform[1],
                        "firmware": {"minimum": platform[2]},
                    }
                ],
            )
            bundle = publish_bytes(
                session=session,
                state=state,
                publisher="bench",
                data=build(draft, {"model.onnx": MODEL_BYTES}, [key]),
            )
            if m == 0:  # telemetry.lua reports windows of this bundle (checked against it)
                (data_dir / "telemetry_bundle.txt").write_text(bundle.sha256)
            if m < assigned:  # what each device reports running at check-in (checkin.lua)
                installed.append(
                    {
                        "model": name,
                        "version": "1.2.3",
                        "bundle_sha256": bundle.sha256,
                        "release_counter": 1,
                        "active_slot": "a",
                        "slots": {"a": "active", "b": "standby"},
                        "last_install": "ok",
                    }
                )
            release(
                session=session,
                model=name,
                version="1.2.3",
                hardware_id=None,
                by="bench",
                state=state,
            )
        creds = data_dir / "creds.txt"
        rows, lines = [], []
        now = datetime.now(UTC)
        for i in range(devices):
            cred = f"efd_bench_{i}_{uuid.uuid4().hex}"
            lines.append(f"dev-{i:05d} {cred}")
            rows.append(
                {
                    "id": f"dev-{i:05d}",
                    "hardware_id": "phone-android",
                    "generation": "phone",
                    "platform": "android",
                    "firmware_version": "14.0.0",
                    "free_flash_bytes": 10**9,
                    "free_ram_bytes": 10**9,
                    "credential_hash": hash_token(cred),
                    "revoked": False,
                    "enrolled_at": now,
                    # As if it had checked in once already: the bench measures a settled fleet.
                    "installed": installed,
                }
            )
        session.execute(insert(Device), rows)
        # The event log has recorded that state too (as after its first check-in), so the bench
        # measures check-ins that change nothing, as a settled fleet's do.
        reported = [InstalledModel.from_dict(m).to_dict() for m in installed]
        recorded = state_hash("14.0.0", reported)
        session.execute(
            insert(DeviceState),
            [
                {
                    "device_id": row["id"],
                    "state_hash": recorded,
                    "firmware_version": "14.0.0",
                    "installed": reported,
                    "recorded_at": now,
                }
                for row in rows
            ],
        )
        session.add(
            ApiToken(
                name="bench",
                role="publisher",
                token_hash=hash_token(PUBLISHER_TOKEN),
                created_at=now,
            )
        )
        session.commit()
    creds.write_text("\n".join(lines) + "\n")
    (data_dir / "installed.json").write_text(json.dumps(installed))
    state.engine.dispose()
    return creds


def wrk(url: str, script: str, creds: Path, duration: int, connections: int) -> tuple[float, int]:
    env = {**os.environ, "EDGEFLEET_BENCH_CREDS": str(creds)}
    telemetry_bundle = creds.parent / "telemetry_bundle.txt"
    if telemetry_bundle.exists():
        env["EDGEFLEET_BENCH_BUNDLE"] = telemetry_bundle.read_text().strip()
    if (creds.parent / "installed.json").exists():
        env["EDGEFLEET_BENCH_INSTALLED"] = str(creds.parent / "installed.json")
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(REPO / "bench" / script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


def start_bare(mode: str, size: int) -> tuple[subprocess.Popen[bytes], str]:
    """The bare endpoint (``async``, ``sync`` or ``floor`` routes: bench/bare_app.py) with a
    ``size``-byte body."""
    bare_port = port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "bare_app:app"),
            *("--port", str(bare_port), "--log-level", "warning"),
        ],
        cwd=REPO / "bench",
        env={**os.environ, "BARE_BODY_BYTES": str(size), "BARE_MODE": mode},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{bare_port}"
    wait(url)
    return process, url


def response_size(url: str, creds: Path) -> int:
    device, cred = creds.read_text().split("\n", 1)[0].split()
    installed = json.loads((creds.parent / "installed.json").read_text())
    r = httpx.post(
        f"{url}/v1/devices/{device}/check-in",
        headers={"Authorization": f"Bearer {cred}"},
        json={
            "device_id": device,
            "nonce": uuid.uuid4().hex,
            "firmware_version": "14.0.0",
            "installed": installed,
        },
    )
    r.raise_for_status()
    return len(r.content)
