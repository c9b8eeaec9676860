"""What a device is offered: per model, the version and bundle it should run now.

One entry point, :func:`offers_for_device`: the current release per model for the device's
hardware id, then what each staged rollout covering it decides for the device's arm
(:mod:`server.arms`), then the device's pins (pins win). Every check-in asks, so answers come
from an :class:`OfferCache` that keeps the release state and the rollouts' rules per hardware id
and the set of pinned devices for ``release_cache_ttl_s``. The worker that
commits a change to what is offered drops its cache after the commit (:meth:`OfferCache.watch`);
on PostgreSQL the commit also notifies every other server process (:mod:`server.invalidation`),
which drops its cache too; the TTL bounds staleness should a notification be missed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from server import invalidation
from server.arms import OFFERING, ArmRule, apply_rules, in_treatment
from server.confirmations import ConfirmedCounters, RolloutMembership, read_confirmed
from server.models import (
    Bundle,
    Cohort,
    CohortMember,
    Confirmation,
    ModelVersion,
    Pin,
    Release,
    Rollout,
)

if TYPE_CHECKING:
    from server.state import ServerState

#: Tables whose rows decide what is offered; a commit that changed any of them drops the cache.
OFFER_TABLES: tuple[type[Any], ...] = (
    Release,
    ModelVersion,
    Bundle,
    Pin,
    Rollout,
    Cohort,
    CohortMember,
    Confirmation,
)
_CHANGED = "edgefleet.offers_changed"

T = TypeVar("T")


@dataclass(frozen=True)
class Offer:
    """What a model offers one device: the version, and its bundle for the hardware id if any."""

    version: str
    release_counter: int
    bundle_sha256: str | None = None
    length: int = 0
    firmware_min: str = "0.0.0"
    firmware_below: str | None = None
    #: A candidate to run in shadow beside this version (a shadow rollout's treatment arm),
    #: on ``shadow_fraction`` of the calls.
    shadow: Offer | None = None
    shadow_fraction: float = 0.0


#: Model name -> what it offers.
Offers = Mapping[str, Offer]


@dataclass(frozen=True)
class _Fresh(Generic[T]):
    read_at: float
    value: T


class OfferCache:
    """Release state per hardware id and the ids of pinned devices, each fresh for ``ttl_s``.

    A read that started before an invalidation is not stored after it (the generation
    counter), so a commit is never followed by a stale entry for another TTL.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.generation = 0
        self._by_hardware: dict[str, _Fresh[Offers]] = {}
        self._rules: dict[str, _Fresh[tuple[ArmRule, ...]]] = {}
        self._pinned: _Fresh[frozenset[str]] | None = None
        self._confirmed: dict[str, _Fresh[ConfirmedCounters]] = {}
        #: Reads in flight (touched on the event loop only): key -> (generation, task).
        self._flights: dict[Hashable, tuple[int, asyncio.Future[Any]]] = {}
        #: Says whether a device is in a rollout, for rollout-scoped confirmations.
        self.rollout_member: RolloutMembership | None = self.in_rollout

    def _fresh(self, entry: _Fresh[T] | None) -> T | None:
        if entry is None or time.monotonic() - entry.read_at >= self.ttl_s:
            return None
        return entry.value

    def released(self, hardware_id: str) -> Offers | None:
        """What is released for ``hardware_id``, if read within the TTL."""
        return self._fresh(self._by_hardware.get(hardware_id))

    def pinned(self) -> frozenset[str] | None:
        """Ids of devices holding any pin, if read within the TTL."""
        return self._fresh(self._pinned)

    def rules(self, hardware_id: str) -> tuple[ArmRule, ...] | None:
        """The rollouts' rules for ``hardware_id``, if read within the TTL."""
        return self._fresh(self._rules.get(hardware_id))

    def holds(self, hardware_id: str) -> bool:
        """Whether every entry a check-in of ``hardware_id`` reads is fresh."""
        return (
            self.pinned() is not None
            and self.released(hardware_id) is not None
            and self.rules(hardware_id) is not None
        )

    def shared(self, key: Hashable, read: Callable[[], T]) -> Awaitable[T]:
        """Run ``read`` in a worker thread, once for all the callers that miss ``key`` together.

        When the cache expires, every device then checking in misses at once; without this each
        would read the same rows (a burst of threads and queries just when the fleet is busy).
        A caller joins a read only if it started in the current generation, so it began after
        the last commit the cache was told of and sees it. Shielded: a caller that goes away
        does not cancel the others' read.
        """
        flight = self._flights.get(key)
        if flight is None or flight[0] != self.generation:
            task = asyncio.ensure_future(asyncio.to_thread(read))
            flight = (self.generation, task)
            self._flights[key] = flight

            def landed(_: asyncio.Future[Any], key: Hashable = key, mine: Any = flight) -> None:
                if self._flights.get(key) is mine:
                    del self._flights[key]

            task.add_done_callback(landed)
        return asyncio.shield(flight[1])

    def lookup(
        self, device_id: str, hardware_id: str, firmware: str, running: Mapping[str, str]
    ) -> Offers | None:
        """The device's offers when the cache alone can answer (no pin, every entry fresh)."""
        pinned = self.pinned()
        if pinned is None or device_id in pinned:
            return None
        released, rules = self.released(hardware_id), self.rules(hardware_id)
        if released is None or rules is None:
            return None
        return (
            apply_rules(released, list(rules), device_id, firmware, running) if rules else released
        )

    def in_rollout(self, rollout_id: int, device_id: str) -> bool:
        """Whether the device is in rollout ``rollout_id``'s treatment arm, by the rules cached
        for any hardware id (False when they are not cached: a rollout-scoped confirmation then
        raises no floor, which never makes a device refuse what it is assigned)."""
        for fresh in self._rules.values():
            for rule in fresh.value:
                if rule.rollout_id == rollout_id:
                    selected = rule.cohort_devices is None or device_id in rule.cohort_devices
                    return selected and in_treatment(rollout_id, device_id, rule.percent)
        return False

    def confirmed(self, hardware_id: str) -> ConfirmedCounters | None:
        """The confirmations for ``hardware_id``, if read within the TTL."""
        return self._fresh(self._confirmed.get(hardware_id))

    def put_confirmed(self, generation: int, hardware_id: str, value: ConfirmedCounters) -> None:
        if generation == self.generation:
            self._confirmed[hardware_id] = _Fresh(time.monotonic(), value)

    def put_released(self, generation: int, hardware_id: str, offers: Offers) -> None:
        if generation == self.generation:
            self._by_hardware[hardware_id] = _Fresh(time.monotonic(), offers)

    def put_rules(self, generation: int, hardware_id: str, rules: tuple[ArmRule, ...]) -> None:
        if generation == self.generation:
            self._rules[hardware_id] = _Fresh(time.monotonic(), rules)

    def put_pinned(self, generation: int, device_ids: frozenset[str]) -> None:
        if generation == self.generation:
            self._pinned = _Fresh(time.monotonic(), device_ids)

    def invalidate(self) -> None:
        """Forget everything; the next check-in of each hardware id reads the database."""
        self.generation += 1
        self._by_hardware = {}
        self._rules = {}
        self._pinned = None
        self._confirmed = {}

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Invalidate after each commit, by a session from ``sessions``, that changed a row of
        :data:`OFFER_TABLES` (after, so no check-in caches what the commit replaces)."""

        @event.listens_for(sessions, "after_flush")
        def _note(session: Session, _: Any) -> None:
            touched = (*session.new, *session.dirty, *session.deleted)
            if any(isinstance(row, OFFER_TABLES) for row in touched):
                session.info[_CHANGED] = True
                invalidation.notify_in(session)  # other processes (PostgreSQL)

        @event.listens_for(sessions, "after_commit")
        def _committed(session: Session) -> None:
            invalidation.forget_sent(session)
            if session.info.pop(_CHANGED, False):
                self.invalidate()

        @event.listens_for(sessions, "after_rollback")
        def _rolled_back(session: Session) -> None:
            invalidation.forget_sent(session)
            session.info.pop(_CHANGED, None)


async def offers_for_device(
    state: ServerState,
    device_id: str,
    hardware_id: str,
    firmware: str = "0.0.0",
    running: Mapping[str, str] | None = None,
) -> Offers:
    """Per model, what ``device_id`` (of ``hardware_id``, on ``firmware``, reporting
    ``running``: model -> version) is offered now.

    From the cache on the event loop when it can answer; after it expires, the entries of
    ``hardware_id`` are read once for all the devices then checking in (:meth:`OfferCache.shared`);
    a pinned device's pins are read for it in a worker thread.
    """
    running = running or {}
    cache = state.offers
    cached = cache.lookup(device_id, hardware_id, firmware, running)
    if cached is None and not cache.holds(hardware_id):
        await cache.shared(("offers", hardware_id), lambda: _read_hardware(state, hardware_id))
        cached = cache.lookup(device_id, hardware_id, firmware, running)
    if cached is not None:
        return cached
    return await asyncio.to_thread(read_offers, state, device_id, hardware_id, firmware, running)


async def confirmed_for_hardware(state: ServerState, hardware_id: str) -> ConfirmedCounters:
    """The confirmations for ``hardware_id`` (docs/rollback.md), cached as the offers are."""
    cached = state.offers.confirmed(hardware_id)
    if cached is not None:
        return cached
    return await state.offers.shared(
        ("confirmed", hardware_id), lambda: _read_confirmed(state, hardware_id)
    )


def _read_confirmed(state: ServerState, hardware_id: str) -> ConfirmedCounters:
    generation = state.offers.generation
    with Session(state.engine) as session:
        value = read_confirmed(session, hardware_id)
    state.offers.put_confirmed(generation, hardware_id, value)
    return value


def _read_hardware(
    state: ServerState, hardware_id: str, session: Session | None = None
) -> tuple[frozenset[str], Offers, tuple[ArmRule, ...]]:
    """The pinned devices, and what is released and what rollouts decide for ``hardware_id``:
    from the cache where fresh, else read (and stored unless the cache was dropped meanwhile)."""
    if session is None:
        with Session(state.engine) as own:
            return _read_hardware(state, hardware_id, own)
    cache = state.offers
    generation = cache.generation
    pinned = cache.pinned()
    if pinned is None:
        pinned = frozenset(session.exec(select(Pin.device_id).distinct()).all())
        cache.put_pinned(generation, pinned)
    released = cache.released(hardware_id)
    if released is None:
        released = _released(session, hardware_id)
        cache.put_released(generation, hardware_id, released)
    rules = cache.rules(hardware_id)
    if rules is None:
        rules = rollout_rules(session, hardware_id)
        cache.put_rules(generation, hardware_id, rules)
    return pinned, released, rules


def read_offers(
    state: ServerState, device_id: str, hardware_id: str, firmware: str, running: Mapping[str, str]
) -> Offers:
    """:func:`offers_for_device` from the database (refreshing the cache's entries)."""
    with Session(state.engine) as session:
        pinned, released, rules = _read_hardware(state, hardware_id, session)
        offers = apply_rules(released, list(rules), device_id, firmware, running)
        if device_id not in pinned:
            return offers
        for pin in session.exec(select(Pin).where(Pin.device_id == device_id)):
            held = _offer_of(session, pin.version_id, hardware_id)
            if held is not None:
                offers[pin.model_name] = held
        return offers


def rollout_rules(session: Session, hardware_id: str) -> tuple[ArmRule, ...]:
    """What each rollout that decides offers on ``hardware_id`` does there."""
    from server.fleet import cohorts_members  # fleet imports this module's cache users

    rules = []
    for rollout in session.exec(
        select(Rollout).where(col(Rollout.state).in_(OFFERING)).order_by(col(Rollout.id))
    ):
        selector = rollout.selector
        if hardware_id not in selector["hardware_ids"] or rollout.id is None:
            continue
        new = _offer_of(session, rollout.version_id, hardware_id)
        if new is None:
            continue
        previous_id = rollout.previous.get(hardware_id)
        previous = None if previous_id is None else _offer_of(session, previous_id, hardware_id)
        members = cohorts_members(session, selector.get("cohorts") or [])
        rules.append(
            ArmRule(
                rollout_id=rollout.id,
                model=rollout.model_name,
                state=rollout.state,
                percent=float(rollout.stages[rollout.stage]["percent"]),
                cohort_devices=members,
                firmware_min=selector.get("firmware_min", "0.0.0"),
                firmware_below=selector.get("firmware_below"),
                new=new,
                previous=previous,
                shadow_fraction=(rollout.shadow or {}).get("sample_fraction"),
            )
        )
    return tuple(rules)


def current_versions(session: Session, hardware_id: str) -> dict[str, ModelVersion]:
    """For each model, the newest release for ``hardware_id`` whose version is not withdrawn."""
    rows = session.exec(
        select(Release, ModelVersion)
        .join(ModelVersion, col(ModelVersion.id) == col(Release.version_id))
        .where(Release.target_id == hardware_id, col(ModelVersion.withdrawn).is_(False))
        .order_by(col(Release.released_at).desc(), col(Release.id).desc())
    ).all()
    current: dict[str, ModelVersion] = {}
    for rel, version in rows:
        current.setdefault(rel.model_name, version)
    return current


def _released(session: Session, hardware_id: str) -> Offers:
    wanted = current_versions(session, hardware_id)
    bundles = {
        b.version_id: b
        for b in session.exec(
            select(Bundle).where(
                col(Bundle.version_id).in_([v.id for v in wanted.values()]),
                Bundle.target_id == hardware_id,
            )
        )
    }
    return {model: _offer(v, bundles.get(v.id or -1)) for model, v in wanted.items()}


def _offer_of(session: Session, version_id: int, hardware_id: str) -> Offer | None:
    version = session.get(ModelVersion, version_id)
    if version is None:
        return None
    bundle = session.exec(
        select(Bundle).where(Bundle.version_id == version_id, Bundle.target_id == hardware_id)
    ).first()
    return _offer(version, bundle)


def _offer(version: ModelVersion, bundle: Bundle | None) -> Offer:
    if bundle is None:
        return Offer(version.version, version.release_counter)
    return Offer(
        version.version,
        version.release_counter,
        bundle.sha256,
        bundle.length,
        bundle.firmware_min,
        bundle.firmware_below,
    )
