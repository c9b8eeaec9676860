"""The offer cache under a burst: when it has expired (or been dropped), the devices checking in
together read the database once, and a read that began before a commit is never handed to a
caller that came after it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from sqlalchemy import event

from server.offers import confirmed_for_hardware, offers_for_device, read_offers
from tests.server.conftest import Fleet


def _count_reads(fleet: Fleet, table: str) -> list[str]:
    """Statements that read ``table`` from now on (SQLAlchemy's cursor event on the engine)."""
    seen: list[str] = []

    @event.listens_for(fleet.state.engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and f"FROM {table}" in statement:
            seen.append(statement)

    return seen


def test_devices_missing_the_cache_together_read_the_release_state_once(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(version="1.0.0"))
    fleet.release("wrist-activity", "1.0.0")
    devices = [f"phone-{i}" for i in range(20)]
    state = fleet.state
    state.offers.invalidate()
    releases = _count_reads(fleet, "release")
    confirmations = _count_reads(fleet, "confirmation")

    async def burst() -> tuple[list[Any], list[Any]]:
        offers = asyncio.gather(
            *(offers_for_device(state, d, "phone-android", "14.0.0") for d in devices)
        )
        confirmed = asyncio.gather(
            *(confirmed_for_hardware(state, "phone-android") for _ in devices)
        )
        return list(await offers), list(await confirmed)

    offers, confirmed = fleet.client.portal.call(burst)  # type: ignore[union-attr]
    assert len(releases) == 1, releases
    assert len(confirmations) == 1, confirmations
    assert all(o["wrist-activity"].version == "1.0.0" for o in offers)
    assert all(c is confirmed[0] for c in confirmed)
    # The same answer as a device's own read.
    assert dict(offers[0]) == dict(read_offers(state, "phone-0", "phone-android", "14.0.0", {}))


def test_a_read_begun_before_an_invalidation_is_not_shared_after_it(fleet: Fleet) -> None:
    cache = fleet.state.offers
    release = threading.Event()
    reads: list[int] = []

    def read() -> int:
        reads.append(cache.generation)
        release.wait(10)
        return len(reads)

    async def scenario() -> tuple[int, int, int]:
        first = cache.shared("key", read)
        joined = cache.shared("key", read)  # same generation: joins the first read
        await asyncio.sleep(0.05)
        cache.invalidate()  # a commit changed what is offered
        after = cache.shared("key", read)  # must not be handed the read begun before
        await asyncio.sleep(0.05)
        release.set()
        return await first, await joined, await after

    first, joined, after = fleet.client.portal.call(scenario)  # type: ignore[union-attr]
    assert len(reads) == 2
    # The second read began in a later generation: later by one on an idle machine, by more when
    # another invalidation came in between (on PostgreSQL the listener drops the cache when it
    # starts listening and on each notification, those of this process's own earlier commits
    # included, which a busy host delivers late).
    assert reads[0] < reads[1]
    assert first == joined
    assert after == 2


def test_a_caller_going_away_does_not_cancel_the_others_read(fleet: Fleet) -> None:
    cache = fleet.state.offers
    release = threading.Event()

    def read() -> str:
        release.wait(10)
        return "read"

    async def scenario() -> str:
        leaving = asyncio.ensure_future(cache.shared("key", read))
        staying = asyncio.ensure_future(cache.shared("key", read))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await asyncio.sleep(0.05)
        release.set()
        return await staying

    assert fleet.client.portal.call(scenario) == "read"  # type: ignore[union-attr]
