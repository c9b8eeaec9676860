"""The fleet part of the demo: a server, a phone's agent, inference offline, telemetry late.

Starts `edgefleet serve --init`, publishes and releases the wearable CNN's phone bundle that the
converter built, starts `edgefleet agent run` for a phone, predicts through the agent's socket,
stops the server and goes on predicting, brings the server back and shows the telemetry arrive
with the exact count. Called by run_demo.py; every process it starts is stopped before it returns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from device_agent.local_api import LocalApiClient, LocalApiError, socket_path

MODEL = "wearable-demo"
#: How long the demo waits for a state it expects before it gives up and says what it waited for.
DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(probe: Callable[[], Any], what: str) -> Any:
    """Poll ``probe`` until it returns something truthy; exit naming ``what`` at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, LocalApiError, OSError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"demo failed: timed out waiting for {what}")


class Background:
    """A long-running `edgefleet` command whose output goes to a log file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.args = args
        self.log = log
        print("$ edgefleet " + " ".join(args) + f" > {log.name} 2>&1 &", flush=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "160"},
            )

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after a while); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(data_dir: Path, port: int, log: Path) -> Background:
    server = Background(log, "serve", "--init", "--data-dir", str(data_dir), "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if server.proc.poll() is not None:
            raise SystemExit(f"demo failed: the server exited: {log.read_text()}")
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

    wait_for(healthy, "the server to answer /healthz")
    return server


def inferences_on_server(url: str, token: str) -> int:
    """The inference count of MODEL in the server's telemetry rollups."""
    rollups = httpx.get(
        f"{url}/v1/telemetry/rollups",
        params={"model": MODEL},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    return sum(int(r["inference_count"]) for r in rollups)


def run_fleet(
    edgefleet: Callable[..., subprocess.CompletedProcess[str]],
    step: Callable[[str], None],
    *,
    bundle: Path,
    eval_data: Path,
    short: bool,
) -> None:
    """Run the slice end to end in the current directory (see the module docstring)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = Path("fleet-data")
    background: list[Background] = []
    try:
        step("10. The fleet server: SQLite, blobs, its own root and keys in one data dir")
        server = start_server(data_dir, port, Path("server.log"))
        background.append(server)
        token_match = re.search(r"efa_[A-Za-z0-9_-]+", Path("server.log").read_text())
        if token_match is None:
            raise SystemExit("demo failed: the server printed no admin token")
        admin = ["--server", url, "--token", token_match.group(0)]
        print(f"serving on {url}; admin token from its first start")

        step("11. Publish the converter's phone bundle (plus the server's release signature)")
        edgefleet(
            "bundle",
            "sign",
            str(bundle),
            "--key",
            str(data_dir / "keys" / "release.pem"),
            "--out",
            "wearable-phone.efb",
        )
        edgefleet("publish", "wearable-phone.efb", *admin)
        edgefleet("release", MODEL, "1.0.0", *admin)
        enroll = json.loads(edgefleet("tokens", "enroll", "--json", *admin).stdout)["token"]

        step("12. A phone's agent: enroll, check in, download, verify, install, self-test")
        state = Path("phone-agent")
        agent = Background(
            Path("agent.log"),
            "agent",
            "run",
            "--server",
            url,
            "--enroll-token",
            enroll,
            "--root",
            str(data_dir / "root.json"),
            "--state-dir",
            str(state),
            "--hardware-id",
            "phone-android",
            "--check-in-interval-s",
            "1",
            "--backoff-max-s",
            "2",
            "--telemetry-window-s",
            "1",
            "--telemetry-flush-every",
            "8",
        )
        background.append(agent)
        client = LocalApiClient(socket_path(state))

        def installed() -> bool:
            return bool(client.status()["models"][MODEL]["active_slot"])

        wait_for(installed, f"{MODEL} 1.0.0 to be installed")
        edgefleet("agent", "status", "--state-dir", str(state))

        step("13. Inference through the agent's socket: the CLI, then an app on the phone")
        x = np.load(eval_data)["X"]
        np.save("window.npy", x[:1])
        edgefleet("agent", "predict", MODEL, "--input", "window.npy", "--state-dir", str(state))
        made = 1
        online = 10 if short else 50
        for i in range(online):
            client.predict(MODEL, x[i % len(x)][None])
        made += online
        print(f"the app made {online} more predictions through {socket_path(state)}")
        wait_for(lambda: inferences_on_server(url, admin[3]) == made, "telemetry on the server")
        print(f"telemetry on the server: {inferences_on_server(url, admin[3])} inferences")

        step("14. The server goes away: inference goes on, telemetry waits in the outbox")
        server.stop()
        print("server stopped")
        offline = 25 if short else 200
        for i in range(offline):
            client.predict(MODEL, x[(i + online) % len(x)][None])
        made += offline
        print(f"{offline} predictions offline, every one answered")

        def waiting() -> bool:
            outbox = client.status()["outbox"]
            pending = outbox["open_windows"] + outbox["closed_windows"] + outbox["pending_batches"]
            return bool(pending > 0)

        def backoffs() -> list[str]:
            lines = Path("agent.log").read_text().splitlines()
            return [line for line in lines if '"event": "backoff"' in line]

        wait_for(backoffs, "the agent to notice the server is gone")
        print("agent.log:", backoffs()[-1])
        wait_for(waiting, "telemetry windows in the outbox")
        edgefleet("agent", "status", "--state-dir", str(state))

        step("15. The server returns (same data, same port): the outbox drains")
        background.append(start_server(data_dir, port, Path("server.log")))
        wait_for(
            lambda: inferences_on_server(url, admin[3]) == made,
            f"{made} inferences on the server",
        )
        total = inferences_on_server(url, admin[3])
        print(
            f"telemetry on the server: {total} inferences of {MODEL} 1.0.0 (the agent made {made})"
        )
        if total != made:
            raise SystemExit("demo failed: the server's totals differ from the inferences made")
    finally:
        for process in reversed(background):
            process.stop()
