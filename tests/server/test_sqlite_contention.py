"""A real server on SQLite answers admin reads while a device checks in continuously.

Regression: check-in's write ran on the event loop and waited there for SQLite's one pooled
connection, which a sync route's session held until its response was sent by that same loop;
every request then stalled for the pool timeout (60 s). Found by the agent's end-to-end tests.
"""

from __future__ import annotations

import threading

import httpx

from tests.procs import ServerProcess
from tests.server.conftest import CAPS

#: Far below the 60 s pool timeout a deadlock waits out, far above any honest answer here.
LIVENESS_TIMEOUT_S = 20.0


def test_admin_reads_are_answered_during_device_check_ins(server: ServerProcess) -> None:
    credential = server.enroll("phone-1", CAPS["phone-android"])
    stop = threading.Event()
    check_ins: list[int] = []

    def device() -> None:
        with httpx.Client(timeout=LIVENESS_TIMEOUT_S * 4) as client:
            while not stop.is_set():
                check_ins.append(server.check_in(client, "phone-1", credential).status_code)

    thread = threading.Thread(target=device)
    thread.start()
    try:
        with httpx.Client(
            timeout=LIVENESS_TIMEOUT_S,
            headers={"Authorization": f"Bearer {server.admin_token}"},
        ) as admin:
            for _ in range(60):
                assert admin.get(f"{server.url}/v1/telemetry/rollups").status_code == 200
                assert admin.get(f"{server.url}/v1/devices").status_code == 200
    finally:
        stop.set()
        thread.join()
    assert check_ins and set(check_ins) == {200}
