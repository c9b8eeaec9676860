"""The anti-rollback rule (docs/rollback.md) on the signed set, with no device around it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from firmware_bundles.anti_rollback import ReleaseCounters
from firmware_bundles.messages import AssignedBundle, AssignmentSet, verify_assignments
from tests.cases import named_cases
from tests.conftest import NOW, Keys

NONCE = "ab" * 16
MODEL = "wrist-activity"


def _set(keys: Keys, counter: int, confirmed: int | None) -> bytes:
    entry: dict[str, Any] = {
        "model": MODEL,
        "version": f"{counter}.0.0",
        "bundle_sha256": "0" * 64,
        "bundle_length": 1234,
        "release_counter": counter,
        "download_url": "/v1/bundles/" + "0" * 64,
    }
    if confirmed is not None:
        entry["confirmed_release_counter"] = confirmed
    signed = AssignmentSet(
        device_id="ring-0001",
        hardware_id="ring-gen3",
        nonce=NONCE,
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        bundles=[AssignedBundle.from_dict(entry)],
    )
    return signed.sign(keys.director[0]).to_bytes()


def _verify(keys: Keys, data: bytes, counters: ReleaseCounters) -> Any:
    root, _ = keys.make_root()
    return verify_assignments(
        data,
        root,
        device_id="ring-0001",
        hardware_id="ring-gen3",
        nonce=NONCE,
        now=NOW,
        min_release_counters=counters,
    )


# (installed so far, floor, the set's entry counter, its confirmed counter) -> accepted, floor
CASES = [
    ("back-to-unconfirmed-older", 3, 1, 1, None, True, 1),
    ("back-to-confirmed", 3, 1, 1, 1, True, 1),
    ("below-confirmed", 3, 1, 1, 2, False, 2),
    ("confirmed-above-installed-rises-to-installed", 2, 0, 1, 5, False, 2),
    ("confirmed-never-lowers-the-floor", 3, 3, 2, 0, False, 3),
    ("fresh-device-installs-confirmed", 0, 0, 2, 2, True, 0),
]


@named_cases(("installed", "floor", "counter", "confirmed", "accepted", "floor_after"), CASES)
def test_floor_rises_to_min_of_confirmed_and_installed_before_entries_are_checked(
    keys: Keys,
    installed: int,
    floor: int,
    counter: int,
    confirmed: int | None,
    accepted: bool,
    floor_after: int,
) -> None:
    counters = ReleaseCounters({MODEL: floor}, {MODEL: installed}, {})
    verified = _verify(keys, _set(keys, counter, confirmed), counters)
    assert bool(verified.assignments) is accepted
    assert verified.counters.floor(MODEL) == floor_after
    if not accepted:
        (refused,) = verified.refused
        assert refused.error.floor == floor_after and refused.error.offered == counter


def test_a_confirmation_heard_once_raises_the_floor_when_the_version_is_installed() -> None:
    """A later set that leaves the field out (an attacker with the director key) cannot undo
    what an earlier one said."""
    heard = ReleaseCounters().hear_confirmed(MODEL, 2)
    assert heard.floor(MODEL) == 0
    assert heard.record_installed(MODEL, 2).floor(MODEL) == 2
    assert heard.record_installed(MODEL, 1).floor(MODEL) == 1


def test_old_sets_without_the_field_verify_and_keep_the_old_floor(keys: Keys) -> None:
    data = _set(keys, 3, None)
    assert b"confirmed_release_counter" not in data
    verified = _verify(keys, data, ReleaseCounters.from_floors({MODEL: 3}))
    assert [a.release_counter for a in verified.assignments] == [3]
    assert verified.assignments[0].confirmed_release_counter is None
    assert _verify(keys, _set(keys, 2, None), ReleaseCounters.from_floors({MODEL: 3})).refused


def test_counters_round_trip_and_read_the_old_format() -> None:
    counters = ReleaseCounters({MODEL: 1}, {MODEL: 3}, {MODEL: 1})
    assert ReleaseCounters.from_dict(counters.to_dict()) == counters
    old = ReleaseCounters.from_dict({"format": 1, "release_counters": {MODEL: 4}})
    assert (old.floor(MODEL), old.installed[MODEL], dict(old.confirmed)) == (4, 4, {})
    with pytest.raises(ValueError, match="installed_release_counters"):
        ReleaseCounters.from_dict({"release_counters": {}, "installed_release_counters": {"m": -1}})
