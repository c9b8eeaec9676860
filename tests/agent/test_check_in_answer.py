"""Everything in a check-in answer that the device acts on is under the director's signature.

A path attacker edits one field of the answer after the server signed it; the agent's
:class:`~device_agent.trust.TrustedState` must refuse the whole answer and v1 must keep running.
``next_check_in_s`` and ``withheld`` are in the table: outside the signature, an attacker could
stretch a device's next check-in to a year (a freeze attack) or hide an update behind a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from device_agent.agent import Agent
from device_agent.errors import TrustError
from firmware_bundles.messages import AssignedBundle, AssignmentSet
from tests.agent.conftest import MODEL, Bundles, assert_answers
from tests.agent.simulator import FleetSimulator

YEAR_S = 365 * 24 * 3600

Edit = Callable[[Any], Any]

#: (field path in the signed set, how to change its value).
EDITS: list[tuple[str, Edit]] = [
    ("_type", lambda v: "assignment"),
    ("device_id", lambda v: "phone-android-someone-else"),
    ("hardware_id", lambda v: "ring-gen3"),
    ("nonce", lambda v: "ab" * 16),
    ("issued_at", lambda v: "2026-05-01T00:00:00Z"),
    ("expires_at", lambda v: "2027-06-01T00:00:00Z"),
    ("withheld", lambda v: {MODEL: "withheld by whoever is on the path"}),
    ("next_check_in_s", lambda v: YEAR_S),
    ("bundles", lambda v: []),
    ("bundles.0.model", lambda v: "gesture-evil"),
    ("bundles.0.version", lambda v: "9.9.9"),
    ("bundles.0.bundle_sha256", lambda v: "0" * 64),
    ("bundles.0.bundle_length", lambda v: v + 1),
    ("bundles.0.release_counter", lambda v: v + 5),
    ("bundles.0.download_url", lambda v: "https://attacker.example/bundle"),
    ("bundles.0.confirmed_release_counter", lambda v: v - 1),
    ("bundles.0.shadow", lambda v: {**v, "sample_fraction": 1.0}),
]
#: A shadow candidate in the answer, so its entry can be edited (never acted on: refused first).
SHADOW = {
    "version": "3.0.0",
    "bundle_sha256": "ab" * 32,
    "bundle_length": 10,
    "release_counter": 3,
    "download_url": "/v1/bundles/" + "ab" * 32,
    "sample_fraction": 0.25,
}


def _aliases(model: type[Any]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def test_the_table_covers_every_field_of_the_set_and_its_entries() -> None:
    top = {path for path, _ in EDITS if "." not in path}
    entry = {path.split(".")[2] for path, _ in EDITS if path.startswith("bundles.0.")}
    assert top == _aliases(AssignmentSet)
    assert entry == _aliases(AssignedBundle)


def _edit(path: str, change: Edit) -> Callable[[dict[str, Any]], None]:
    def tamper(answer: dict[str, Any]) -> None:
        where: Any = answer["signed"]
        *parents, last = path.split(".")
        for part in parents:
            where = where[int(part)] if isinstance(where, list) else where[part]
        key: Any = int(last) if isinstance(where, list) else last
        where[key] = change(where[key])

    return tamper


@pytest.mark.parametrize(("path", "change"), EDITS, ids=[e[0] for e in EDITS])
def test_an_answer_edited_after_signing_is_refused(
    installed: Agent, sim: FleetSimulator, bundles: Bundles, path: str, change: Edit
) -> None:
    sim.assignment_overrides["confirmed_release_counter"] = 1  # present, so it can be edited
    sim.assignment_overrides["shadow"] = SHADOW
    sim.assign(MODEL, bundles.v2.data)
    sim.tamper_answer = _edit(path, change)
    with pytest.raises(TrustError) as refused:
        installed.check_in()
    assert refused.value.kind == "signature", refused.value
    assert_answers(installed, bundles.v1)
    assert installed.status()["withheld"] == {}


def test_a_signed_next_check_in_beyond_a_day_is_refused(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    """Even the director's own word cannot put a device to sleep for longer than a day."""
    sim.assign(MODEL, bundles.v2.data)
    sim.next_check_in_s = YEAR_S
    with pytest.raises(TrustError, match="next_check_in_s") as refused:
        installed.check_in()
    assert refused.value.kind == "schema"
    assert_answers(installed, bundles.v1)


def test_withheld_and_next_check_in_come_from_the_signed_set(
    installed: Agent, sim: FleetSimulator
) -> None:
    sim.withheld = {"keyword": "keyword 1.0.0 has no bundle for phone-android"}
    sim.next_check_in_s = 120
    result = installed.check_in()
    assert result.withheld == sim.withheld and result.next_check_in_s == 120
    assert installed.status()["withheld"] == sim.withheld
