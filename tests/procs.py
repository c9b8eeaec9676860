"""Real processes for end-to-end tests: an `edgefleet serve` server and `edgefleet agent run`
agents, with polling that waits on state under a deadline (never sleep-and-hope)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from firmware_bundles import SigningKey

T = TypeVar("T")
#: How long a test waits for a state it expects; generous, since CI machines are shared.
DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    *,
    timeout_s: float = DEADLINE_S,
    every_s: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = probe()
        except Exception as exc:  # a probe may fail until the state exists
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {last!r}")
        time.sleep(every_s)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edgefleet ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def terminate(proc: subprocess.Popen[bytes], *, timeout_s: float) -> int:
    """SIGTERM ``proc`` if it still runs and wait (SIGKILL after ``timeout_s``); its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a log file (other lines are skipped)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return out


@dataclass
class ServerProcess:
    """`edgefleet serve --init` on loopback, stoppable and restartable on the same port and data.

    ``init=False`` starts on trust material that is already there (no admin token is printed);
    ``serve_args`` are further `serve` options (``--database-url``, ``--log-level``); ``env``
    adds ``EDGEFLEET_*`` settings.
    """

    data_dir: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    admin_token: str = ""
    init: bool = True
    serve_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> list[Path]:
        return [self.log_dir / f"server-{i}.log" for i in range(1, self.starts + 1)]

    def requests(self) -> list[dict[str, Any]]:
        """The server's JSON request log lines, over every start."""
        return [r for log in self.logs for r in json_lines(log) if "path" in r]

    @property
    def release_key(self) -> SigningKey:
        """The release key `serve --init` made for the development root."""
        return SigningKey.from_pem((self.data_dir / "keys" / "release.pem").read_bytes())

    def start(self) -> ServerProcess:
        self.starts += 1
        log = self.log_dir / f"server-{self.starts}.log"
        init = ["--init"] if self.init else []
        where = ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "serve", *init, *where, *self.serve_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "200", **self.env},
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {log.read_text()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, "the server to answer /healthz", timeout_s=DEADLINE_S)
        except AssertionError:
            self.stop()
            raise
        if not self.admin_token:
            token = re.search(r"efa_[A-Za-z0-9_-]+", log.read_text())
            assert token, log.read_text()
            self.admin_token = token.group(0)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout_s=15)
        self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An admin client command against this server."""
        return cli(*args, "--server", self.url, "--token", self.admin_token)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """An admin API call; the JSON answer."""
        r = httpx.request(
            method,
            f"{self.url}{path}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
            **kwargs,
        )
        assert r.status_code < 400, r.text
        return r.json()

    def publish(self, bundle: Path) -> str:
        """Publish a bundle file with `edgefleet publish`; its SHA-256."""
        published = self.cli("publish", str(bundle), "--json")
        assert published.returncode == 0, published.stderr
        return str(json.loads(published.stdout)[0]["sha256"])

    def publish_and_release(self, bundle: Path, model: str, version: str) -> str:
        """Publish a bundle file and release its version; its SHA-256."""
        bundle_sha256 = self.publish(bundle)
        released = self.cli("release", model, version)
        assert released.returncode == 0, released.stderr
        return bundle_sha256

    def enroll_token(self, max_uses: int = 10) -> str:
        created = self.cli("tokens", "enroll", "--max-uses", str(max_uses), "--json")
        assert created.returncode == 0, created.stderr
        return str(json.loads(created.stdout)["token"])

    def enroll(self, device_id: str, capabilities: dict[str, Any]) -> str:
        """Enroll ``device_id`` over HTTP with a fresh token; its credential."""
        enrolled = httpx.post(
            f"{self.url}/v1/devices/enroll",
            json={
                "enroll_token": self.enroll_token(),
                "device_id": device_id,
                "capabilities": capabilities,
            },
        )
        assert enrolled.status_code == 201, enrolled.text
        return str(enrolled.json()["credential"])

    def check_in(
        self,
        client: httpx.Client,
        device_id: str,
        credential: str,
        firmware_version: str = "14.0.0",
    ) -> httpx.Response:
        """One check-in by ``device_id`` over ``client`` with a fresh nonce; the raw answer."""
        return client.post(
            f"{self.url}/v1/devices/{device_id}/check-in",
            headers={"Authorization": f"Bearer {credential}"},
            json={
                "device_id": device_id,
                "nonce": uuid.uuid4().hex,
                "firmware_version": firmware_version,
            },
        )


@dataclass
class AgentProcess:
    """`python -m edgefleet agent run` with settings from EDGEFLEET_AGENT_* variables."""

    state_dir: Path
    log_dir: Path
    settings: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def logs(self) -> list[Path]:
        return [self.log_dir / f"agent-{i}.log" for i in range(1, self.starts + 1)]

    def events(self, event: str | None = None, *, latest: bool = False) -> list[dict[str, Any]]:
        """The agent's JSON event lines over every start, or the ``latest`` start's only (only
        ``event`` if given)."""
        logs = self.logs[-1:] if latest else self.logs
        lines = [r for log in logs for r in json_lines(log) if "event" in r]
        return [r for r in lines if event is None or r["event"] == event]

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())

    def start(self, **overrides: str | None) -> AgentProcess:
        """Start the agent; ``overrides`` (setting name -> value, None to unset) apply to it."""
        self.starts += 1
        settings = {**self.settings, **overrides}
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_AGENT_")}
        env.update({f"EDGEFLEET_AGENT_{k.upper()}": v for k, v in settings.items() if v})
        with (self.log_dir / f"agent-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "agent", "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL from outside, as a power cut or the OOM killer would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not stop); the exit code."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout_s=30)
        self.proc = None
        return code

    def agent_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`edgefleet agent ARGS --state-dir` this agent's state dir."""
        return cli("agent", *args, "--state-dir", str(self.state_dir))

    def status(self) -> dict[str, Any]:
        done = self.agent_cli("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result
