"""The server's periodic jobs give up their leases when the server stops, so a restarted server
(or another process) takes the jobs over at once; a run still going keeps its lease."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

from sqlmodel import Session, select

from server.db import make_engine, upgrade
from server.jobs import Job, Jobs
from server.leases import take_lease
from server.models import JobLock


def test_stopping_gives_up_the_leases_of_jobs_not_mid_run(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    finished = threading.Event()
    busy, let_go = threading.Event(), threading.Event()

    def lease(name: str) -> None:
        with Session(engine) as session:
            assert take_lease(session, name, now=datetime.now(UTC), ttl_s=60)

    def quick() -> None:
        lease("quick")
        finished.set()

    def slow() -> None:
        lease("slow")
        busy.set()
        let_go.wait(30)

    async def run_and_stop() -> None:
        jobs = Jobs([Job("quick", 3600, quick, "quick"), Job("slow", 3600, slow, "slow")], engine)
        jobs.start()
        assert await asyncio.to_thread(finished.wait, 30)
        assert await asyncio.to_thread(busy.wait, 30)
        await jobs.stop()
        let_go.set()  # the slow run ends after the stop, as a delivery round in flight would

    try:
        asyncio.run(run_and_stop())
        with Session(engine) as session:
            held = {lock.name for lock in session.exec(select(JobLock))}
        # The slow run was still going: another process must not start it meanwhile.
        assert held == {"slow"}
    finally:
        let_go.set()
        engine.dispose()
