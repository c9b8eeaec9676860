"""A private PostgreSQL cluster for the fault suite: made with ``initdb`` in a temporary directory
and started on a free port, so tests can stop, kill and restart it without touching the
machine's shared server."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port

#: Where Debian keeps the server's programs (pg_config --bindir names them elsewhere).
_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14")]


def _bin_dir() -> Path:
    for candidate in _BIN_DIRS:
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise AssertionError("no initdb: the fault suite needs PostgreSQL's server programs")


@dataclass
class PrivateCluster:
    """One cluster in ``directory``; :meth:`url` names its database ``fleet``."""

    directory: Path
    port: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._bin = _bin_dir()
        # initdb refuses to run as root; run the server programs as the postgres user then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "fleet") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout}{done.stderr}"

    def create(self) -> PrivateCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(self._bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        self._run(
            str(self._bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "fleet",
        )  # fmt: skip
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.directory / "server.log"), "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``mode`` ``immediate`` is a crash: no checkpoint, clients cut off."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
