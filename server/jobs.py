"""Periodic work inside the server process (telemetry folding and retention, the rollout
evaluator, outbound deliveries, threshold checks): each job runs in a worker thread on its
interval, logs its failures and goes on, and stops when the server shuts down, giving up its
lease."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Session

from server import evaluator, fold, leases, outbound, telemetry, triggers
from server.fold_worker import FoldWorker
from server.outbound import Deliverer
from server.state import ServerState

log = logging.getLogger("edgefleet.server.jobs")


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], object]
    #: The lease each run takes (one process at a time does the job), given up at shutdown.
    lease: str | None = None
    #: Called when the server stops (after the job's last run was cancelled or left running).
    close: Callable[[], None] | None = None


def jobs_for(state: ServerState) -> list[Job]:
    """The periodic jobs of a server with ``state``'s settings."""
    settings = state.settings

    def drop_expired() -> int:
        with state.sessions() as session:
            dropped = telemetry.drop_expired_windows(
                session,
                now=datetime.now(UTC),
                retention_days=settings.telemetry_retention_days,
            )
        if dropped:
            log.info(
                "dropped %d telemetry windows older than %d days (rollups kept)",
                dropped,
                settings.telemetry_retention_days,
            )
        return dropped

    def evaluate_rollouts() -> int:
        with state.sessions() as session:
            return evaluator.evaluate_due(
                session,
                relative_accuracy=settings.telemetry_relative_accuracy,
                lease_s=3 * settings.rollout_evaluation_s,
            )

    fold_limit, fold_lease_s = (
        settings.telemetry_fold_max_windows,
        max(settings.telemetry_fold_lease_s, 10 * settings.telemetry_fold_s),
    )
    folder = (
        FoldWorker(
            state.engine,
            relative_accuracy=settings.telemetry_relative_accuracy,
            limit=fold_limit,
            lease_s=fold_lease_s,
            folders=settings.telemetry_fold_folders,
        )
        if settings.telemetry_fold_in_child
        else None
    )

    def fold_windows() -> int:
        if folder is not None:
            return folder.run()
        with state.sessions() as session:
            return fold.fold_due(
                session,
                relative_accuracy=settings.telemetry_relative_accuracy,
                limit=fold_limit,
                lease_s=fold_lease_s,
                folders=settings.telemetry_fold_folders,
            )

    def check_thresholds() -> int:
        with state.sessions() as session:
            return triggers.run(
                session,
                now=datetime.now(UTC),
                relative_accuracy=settings.telemetry_relative_accuracy,
                lease_s=max(60.0, 3 * settings.threshold_check_s),
            )

    deliver = Deliverer(state.engine, settings).run
    return [
        Job("telemetry-retention", settings.telemetry_retention_check_s, drop_expired),
        Job(
            "telemetry-fold",
            settings.telemetry_fold_s,
            fold_windows,
            # In a child, the child gives the lease up after each run.
            None if folder is not None else fold.LEASE,
            None if folder is None else folder.close,
        ),
        Job("rollout-evaluator", settings.rollout_evaluation_s, evaluate_rollouts, evaluator.LEASE),
        Job("threshold-checks", settings.threshold_check_s, check_thresholds, triggers.LEASE),
        Job("outbound-delivery", settings.outbound_poll_s, deliver, outbound.LEASE),
    ]


class Jobs:
    """The running jobs of one server process."""

    def __init__(self, jobs: list[Job], engine: Engine) -> None:
        self._jobs = jobs
        self._engine = engine
        self._tasks: list[asyncio.Task[None]] = []
        #: Jobs with a run in a worker thread (a cancelled run's thread goes on to its end).
        self._running: set[str] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._every(job), name=job.name) for job in self._jobs]

    async def _every(self, job: Job) -> None:
        while True:
            self._running.add(job.name)
            try:
                result = await asyncio.to_thread(job.run)
            except Exception:  # one failed run must not stop the job or the server
                log.exception("job %s failed; next run in %s s", job.name, job.interval_s)
            else:
                log.debug("job %s: %s", job.name, result)
            self._running.discard(job.name)
            await asyncio.sleep(job.interval_s)

    async def stop(self) -> None:
        """Stop every job, then give up the leases of those not mid-run (a run still going in
        its thread keeps its lease until the lease expires, so no other process overlaps it)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for job in self._jobs:
            if job.close is not None:
                job.close()
        idle = [j.lease for j in self._jobs if j.lease and j.name not in self._running]
        try:
            await asyncio.to_thread(self._release, idle)
        except Exception:  # the leases then expire as after a crash
            log.exception("giving up the job leases %s failed", idle)

    def _release(self, names: list[str]) -> None:
        with Session(self._engine) as session:
            leases.release_leases(session, names)
