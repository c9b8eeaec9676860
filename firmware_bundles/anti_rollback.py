"""The anti-rollback rule every device keeps (agent and ring alike), as pure data.

Per model, a device keeps three release counters: the **floor** (no assignment below it is
accepted), the highest it has **installed** and self-tested, and the highest the director said
the server **confirmed** for it. A newly activated version is on trial, as an MCUboot test image
is: the floor rises only to ``min(confirmed, installed)`` and never falls, so a holder of only
the director key can take a device back to a version it ran, but never below the last version
confirmed for it. ``docs/rollback.md`` has the whole rule and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _bump(counters: Mapping[str, int], model: str, counter: int) -> dict[str, int]:
    out = dict(counters)
    out[model] = max(out.get(model, 0), counter)
    return out


@dataclass(frozen=True)
class ReleaseCounters:
    """A device's anti-rollback counters per model; every method returns a new value.

    Attributes:
        floors: The lowest release counter accepted per model (never decreases).
        installed: The highest release counter installed and self-tested per model.
        confirmed: The highest confirmed release counter the director named per model.
    """

    floors: Mapping[str, int] = field(default_factory=dict)
    installed: Mapping[str, int] = field(default_factory=dict)
    confirmed: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_floors(cls, floors: Mapping[str, int]) -> ReleaseCounters:
        """Counters kept under the old rule (the floor rose at each activation): each floor
        is also the highest installed, and stays the floor (never lowered)."""
        return cls(dict(floors), dict(floors), {})

    def floor(self, model: str) -> int:
        """The lowest release counter ``model`` may be assigned (0 if none)."""
        return self.floors.get(model, 0)

    def hear_confirmed(self, model: str, counter: int) -> ReleaseCounters:
        """The director says the server confirmed release ``counter`` of ``model`` for this
        device; the floor rises to it once the device has installed that far."""
        return self._settled(model, self.installed, _bump(self.confirmed, model, counter))

    def record_installed(self, model: str, counter: int) -> ReleaseCounters:
        """Release ``counter`` of ``model`` passed its self-test and is active (on trial)."""
        return self._settled(model, _bump(self.installed, model, counter), self.confirmed)

    def _settled(
        self, model: str, installed: Mapping[str, int], confirmed: Mapping[str, int]
    ) -> ReleaseCounters:
        reached = min(confirmed.get(model, 0), installed.get(model, 0))
        floors = _bump(self.floors, model, reached) if reached > self.floor(model) else self.floors
        return ReleaseCounters(floors, installed, confirmed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``release_counters`` keeps its old name (the floors) so a device's
        persisted state stays readable by the code that wrote format 1."""
        return {
            "release_counters": dict(sorted(self.floors.items())),
            "installed_release_counters": dict(sorted(self.installed.items())),
            "confirmed_release_counters": dict(sorted(self.confirmed.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleaseCounters:
        """Parse :meth:`to_dict`; state without the newer keys is read as :meth:`from_floors`.

        Raises:
            ValueError: If a map is not model names to integers >= 0.
        """
        floors = _counters(data.get("release_counters", {}), "release_counters")
        if "installed_release_counters" not in data:
            return cls.from_floors(floors)
        installed = _counters(data["installed_release_counters"], "installed_release_counters")
        confirmed = _counters(
            data.get("confirmed_release_counters", {}), "confirmed_release_counters"
        )
        return cls(floors, installed, confirmed)


def _counters(value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()
    ):
        raise ValueError(f"{name} must map model names to integers >= 0")
    return dict(value)
