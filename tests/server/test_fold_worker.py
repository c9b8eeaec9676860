"""The fold in a child process: started only when windows wait, folds them there (not in the
server's process) under the fold's lease and gives the lease up after each run, and a child that
dies is replaced at the next run with nothing counted twice or lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from server.fold import LEASE
from server.fold_worker import FoldWorker
from server.models import JobLock, TelemetryRollup
from tests.server.conftest import Fleet
from tests.server.test_metrics import _same_figures
from tests.server.test_telemetry_fold import _figures, _unfolded, _upload


def _worker(fleet: Fleet) -> FoldWorker:
    return FoldWorker(
        fleet.state.engine, relative_accuracy=0.01, limit=10_000, lease_s=60, folders=2
    )


def _in_rollups(fleet: Fleet) -> int:
    with Session(fleet.state.engine) as session:
        return int(
            session.exec(select(func.coalesce(func.sum(TelemetryRollup.window_count), 0))).one()
        )


def test_the_fold_runs_in_a_child_started_when_windows_wait(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    worker = _worker(fleet)
    try:
        assert worker.run() == 0
        assert worker.child_pids == []  # nothing waited: no child started
        _, raws = _upload(fleet, "child")
        waiting = _figures(fleet, "child")
        assert worker.run() == len(raws)
        [child] = worker.child_pids
        assert child != os.getpid()
        assert _unfolded(fleet) == 0
        assert _in_rollups(fleet) == len(raws)
        for before, after in zip(waiting, _figures(fleet, "child"), strict=True):
            _same_figures(before, after)
        with Session(fleet.state.engine) as session:
            assert session.get(JobLock, LEASE) is None  # given up: any process may fold next
        assert worker.run() == 0
    finally:
        worker.close()


def test_a_dead_child_is_replaced_and_nothing_counts_twice(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    worker = _worker(fleet)
    try:
        _, first = _upload(fleet, "dies", devices=2)
        assert worker.run() == len(first)
        [child] = worker.child_pids
        os.kill(child, signal.SIGKILL)
        _, second = _upload(fleet, "after", devices=2)
        with pytest.raises(BrokenProcessPool):
            worker.run()
        assert worker.run() == len(second)
        [replacement] = worker.child_pids
        assert replacement != child
        assert _unfolded(fleet) == 0
        assert _in_rollups(fleet) == len(first) + len(second)
    finally:
        worker.close()


_SERVER_STAND_IN = """
import sys, time
from server.db import make_engine
from server.fold_worker import FoldWorker
worker = FoldWorker(make_engine(sys.argv[1]), relative_accuracy=0.01, limit=10_000, lease_s=60,
                    folders=1)
print(worker.run(), worker.child_pids[0], flush=True)
time.sleep(600)
"""


def test_the_child_exits_when_its_server_dies(unfolded_fleet: Fleet) -> None:
    """A process standing in for the server starts the child, folds, and is SIGKILLed."""
    fleet = unfolded_fleet
    _, raws = _upload(fleet, "orphan", devices=1)
    url = fleet.state.engine.url.render_as_string(hide_password=False)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER_STAND_IN, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        folded, child = (int(v) for v in server.stdout.readline().split())
        assert folded == len(raws)
        assert Path(f"/proc/{child}").exists()
    finally:
        server.kill()
        server.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the fold child outlived its server"
