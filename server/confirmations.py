"""Confirmations: the server's word that a version is good for the devices of a hardware id.

A device's anti-rollback floor for a model rises only to a release the server confirmed for it
(``docs/rollback.md``); each check-in answer names that release counter per model. A plain
release does not confirm (so ``withdraw`` can still take devices back); an operator confirms
with :func:`confirm` (``POST /v1/models/{name}/versions/{version}/confirm``), and a completed
rollout confirms for the devices it selected (``rollout_id`` set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlmodel import Session, col, select

from firmware_bundles import CatalogueError, TargetCatalogue
from server.errors import ApiError
from server.models import Bundle, Confirmation, ModelVersion

#: Whether a device is among those rollout ``rollout_id`` selected: (rollout id, device id).
RolloutMembership = Callable[[int, str], bool]


@dataclass(frozen=True)
class ConfirmedCounters:
    """The confirmations that apply to one hardware id, as the check-in hot path reads them.

    Attributes:
        fleet: Per model, the highest release counter confirmed for every device of the
            hardware id.
        by_rollout: Per model, ``(rollout id, release counter)`` of confirmations that apply
            only to the devices each rollout selected.
    """

    fleet: Mapping[str, int] = field(default_factory=dict)
    by_rollout: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def counter(self, model: str, device_id: str, member: RolloutMembership | None = None) -> int:
        """The highest release counter of ``model`` confirmed for ``device_id`` (0 if none).

        Rollout-scoped confirmations count only where ``member`` says the device is in the
        rollout; without ``member`` they count for no device (the floor then stays lower, which
        never refuses a version the server assigns).
        """
        best = self.fleet.get(model, 0)
        if member is not None:
            for rollout_id, counter in self.by_rollout.get(model, ()):
                if counter > best and member(rollout_id, device_id):
                    best = counter
        return best


def read_confirmed(session: Session, hardware_id: str) -> ConfirmedCounters:
    """Every confirmation for ``hardware_id``, folded per model."""
    fleet: dict[str, int] = {}
    by_rollout: dict[str, list[tuple[int, int]]] = {}
    rows = session.exec(select(Confirmation).where(Confirmation.hardware_id == hardware_id))
    for row in rows:
        if row.rollout_id is None:
            fleet[row.model_name] = max(fleet.get(row.model_name, 0), row.release_counter)
        else:
            by_rollout.setdefault(row.model_name, []).append((row.rollout_id, row.release_counter))
    return ConfirmedCounters(fleet, {m: tuple(sorted(r)) for m, r in by_rollout.items()})


def confirmed_counter(
    source: Session | ConfirmedCounters,
    model: str,
    hardware_id: str,
    device_id: str,
    member: RolloutMembership | None = None,
) -> int:
    """The release counter of ``model`` confirmed for ``device_id`` of ``hardware_id`` (0 if
    none), from the database or from what :func:`read_confirmed` read for that hardware id."""
    counters = source
    if not isinstance(counters, ConfirmedCounters):
        counters = read_confirmed(counters, hardware_id)
    return counters.counter(model, device_id, member)


def confirmation(
    version: ModelVersion, hardware_id: str, *, at: datetime, by: str, rollout_id: int | None = None
) -> Confirmation:
    """The row that confirms ``version`` on ``hardware_id``: its release counter becomes a floor
    for the devices ``rollout_id`` selected (None: all of them)."""
    assert version.id is not None
    return Confirmation(
        model_name=version.model_name,
        hardware_id=hardware_id,
        version_id=version.id,
        release_counter=version.release_counter,
        rollout_id=rollout_id,
        confirmed_at=at,
        confirmed_by=by,
    )


def confirm(
    session: Session,
    model: str,
    version: str,
    hardware_ids: list[str] | None,
    by: str,
    rollout_id: int | None = None,
    *,
    catalogue: TargetCatalogue | None = None,
) -> tuple[ModelVersion, list[str]]:
    """Confirm ``version`` of ``model`` for ``hardware_ids`` (None: every hardware id it has a
    bundle for), for the devices ``rollout_id`` selected or, without it, for all of them.

    Returns:
        The version and the hardware ids confirmed for.

    Raises:
        ApiError: 404 for an unknown version; 400 for a hardware id the catalogue does not
            know; 409 if withdrawn or without a bundle for a hardware id named.
    """
    # Imported here: server.registry imports server.state, which imports server.offers, which
    # imports this module for the hot path.
    from server.registry import get_version

    found = get_version(session, model, version)
    if found.withdrawn:
        raise ApiError(409, f"{model} {version} is withdrawn; a withdrawn version is not confirmed")
    for hardware_id in hardware_ids or []:
        try:
            (catalogue or TargetCatalogue.load_default()).get(hardware_id)
        except CatalogueError as exc:
            raise ApiError(400, f"unknown hardware id {hardware_id!r}: {exc}") from exc
    bundles = session.exec(select(col(Bundle.target_id)).where(Bundle.version_id == found.id))
    has = sorted(set(bundles.all()))
    targets = has if hardware_ids is None else sorted(set(hardware_ids))
    missing = [t for t in targets if t not in has]
    if missing or not targets:
        raise ApiError(
            409,
            f"{model} {version} has no bundle for {', '.join(missing) or 'any hardware id'};"
            f" it has: {', '.join(has) or 'none'}",
        )
    now = datetime.now(UTC)
    for hardware_id in targets:
        session.add(confirmation(found, hardware_id, at=now, by=by, rollout_id=rollout_id))
    session.commit()
    return found, targets
