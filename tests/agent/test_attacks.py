"""Attacks on a device agent, one row or one short test each, as python-tuf tests its client.

Every attack starts from an agent running v1 of the model; the simulator is then turned hostile
in one line while offering v2. Each asserts the specific error and that v1 still answers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.errors import (
    AgentError,
    DeadlineError,
    OversizeError,
    StallError,
    TrustError,
)
from firmware_bundles import SigningKey, sign_root
from tests.agent.conftest import (
    MODEL,
    OTHER_MODEL,
    PROBE,
    AgentFactory,
    Bundles,
    assert_answers,
)
from tests.agent.simulator import FleetSimulator
from tests.conftest import NOW, Keys

Attack = Callable[[FleetSimulator, Bundles], None]


def _outcome(agent: Agent) -> AgentError:
    """The error a check-in ends with: raised (the whole answer refused) or reported (one
    model's install failed)."""
    try:
        result = agent.check_in()
    except AgentError as exc:
        return exc
    errors = result.errors
    assert list(errors) == [MODEL], result
    return errors[MODEL]


def _set(**fields: object) -> Attack:
    def attack(sim: FleetSimulator, bundles: Bundles) -> None:
        sim.assignment_overrides.update(fields)

    return attack


def _offer(name: str) -> Attack:
    def attack(sim: FleetSimulator, bundles: Bundles) -> None:
        sim.assign(MODEL, getattr(bundles, name).data)

    return attack


def _sim(**attributes: object) -> Attack:
    def attack(sim: FleetSimulator, bundles: Bundles) -> None:
        for name, value in attributes.items():
            setattr(sim, name, value)

    return attack


def _length(delta: int) -> Attack:
    def attack(sim: FleetSimulator, bundles: Bundles) -> None:
        sim.assignment_overrides["bundle_length"] = len(bundles.v2.data) + delta

    return attack


def _quiet_oversize(sim: FleetSimulator, bundles: Bundles) -> None:
    sim.extra_bytes = 10_000
    sim.announce_length = len(bundles.v2.data)  # says the right length, then keeps sending


ATTACKS: list[tuple[str, Attack, type[AgentError], str | None]] = [
    ("bad-signature", _sim(director_key=SigningKey.generate()), TrustError, "signature"),
    ("wrong-device", _set(device_id="phone-android-someone-else"), TrustError, "wrong-device"),
    ("wrong-hardware", _set(hardware_id="ring-gen3"), TrustError, "wrong-hardware"),
    # v1 confirmed (the floor rises to 1, which v1 reached), an entry at 0 below it.
    (
        "rollback-below-confirmed-floor",
        _set(release_counter=0, confirmed_release_counter=1),
        TrustError,
        "rollback",
    ),
    (
        "expired-assignment",
        _set(issued_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(seconds=1)),
        TrustError,
        "expired",
    ),
    ("replayed-nonce", _sim(replay_last_answer=True), TrustError, "replay"),
    ("oversize-announced", _sim(extra_bytes=10_000), OversizeError, None),
    ("oversize-unannounced", _quiet_oversize, OversizeError, None),
    ("length-cap-below-bundle", _length(-1), OversizeError, None),
    ("stalled-download", _sim(stall_after_bytes=100), StallError, None),
    ("slow-drip-stall-timer", _sim(drip_s=31.0), StallError, None),
    ("slow-drip-deadline", _sim(drip_s=20.0, chunk_bytes=32), DeadlineError, None),
    ("bundle-for-another-generation", _offer("ring"), TrustError, "target"),
    ("tampered-bundle-bytes", _sim(tamper_offset=700), TrustError, "mismatch"),
    ("release-threshold-not-met", _offer("one_signature"), TrustError, "signature"),
    ("mix-and-match-counter", _set(release_counter=5), TrustError, "mismatch"),
    ("mix-and-match-version", _set(version="9.9.9"), TrustError, "mismatch"),
]


@pytest.mark.parametrize(
    ("attack", "error", "kind"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_is_refused_and_v1_keeps_answering(
    installed: Agent,
    sim: FleetSimulator,
    bundles: Bundles,
    attack: Attack,
    error: type[AgentError],
    kind: str | None,
) -> None:
    sim.assign(MODEL, bundles.v2.data)
    attack(sim, bundles)
    outcome = _outcome(installed)
    assert type(outcome) is error, outcome
    if kind is not None:
        assert isinstance(outcome, TrustError) and outcome.kind == kind, outcome
    assert_answers(installed, bundles.v1)
    assert installed.status()["models"][MODEL]["version"] == "1.0.0"


def test_older_bundle_after_newer_confirmed_is_refused_as_rollback(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    sim.assignment_overrides["confirmed_release_counter"] = 2
    sim.assign(MODEL, bundles.v2.data)
    assert installed.check_in().installs[0].action == "installed"
    sim.assignment_overrides.clear()  # the director-key holder leaves the confirmation out
    sim.assign(MODEL, bundles.v1.data)
    fetched = len(sim.downloads(bundles.v1.bundle_sha256))
    refused = _outcome(installed)
    assert isinstance(refused, TrustError)
    assert refused.kind == "rollback" and refused.model == MODEL and "below 2" in str(refused)
    assert len(sim.downloads(bundles.v1.bundle_sha256)) == fetched, "refused before any download"
    assert_answers(installed, bundles.v2)


def test_rollback_floor_survives_a_restart(
    installed: Agent, make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> None:
    sim.assignment_overrides["confirmed_release_counter"] = 2
    sim.assign(MODEL, bundles.v2.data)
    installed.check_in()
    sim.assignment_overrides.clear()
    restarted = make_agent()
    sim.assign(MODEL, bundles.v1.data)
    refused = _outcome(restarted)
    assert isinstance(refused, TrustError) and refused.kind == "rollback"
    assert_answers(restarted, bundles.v2)


def _rotate(keys: Keys, sim: FleetSimulator, signers: list[SigningKey]) -> SigningKey:
    """Root v2 with a new director key, signed by ``signers``; returns the new director key."""
    director = SigningKey.generate()
    new_root_keys = [SigningKey.generate()]
    rotated = Keys(root=new_root_keys, release=keys.release, director=[director], hil=keys.hil)
    root, _ = rotated.make_root(version=2)
    envelope = sign_root(root, [*signers, *new_root_keys] if signers else new_root_keys)
    sim.roots[2] = envelope.to_bytes()
    return director


def test_root_rotation_is_followed(
    installed: Agent, make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, keys: Keys
) -> None:
    sim.director_key = _rotate(keys, sim, signers=keys.root)
    sim.assign(MODEL, bundles.v2.data)
    result = installed.check_in()
    assert result.root_version == 2 and result.installs[0].action == "installed"
    assert_answers(installed, bundles.v2)
    assert make_agent().status()["root_version"] == 2  # the rotated root survives a restart


def test_root_not_signed_by_the_old_root_is_refused(
    installed: Agent, sim: FleetSimulator, bundles: Bundles, keys: Keys
) -> None:
    sim.director_key = _rotate(keys, sim, signers=[])
    sim.assign(MODEL, bundles.v2.data)
    with pytest.raises(TrustError) as refused:
        installed.check_in()
    assert refused.value.kind == "signature" and "root rotation" in str(refused.value)
    assert installed.status()["root_version"] == 1
    assert_answers(installed, bundles.v1)


def test_expired_root_freezes_updates_not_inference(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    sim.clock.advance(timedelta(days=366).total_seconds())
    sim.assign(MODEL, bundles.v2.data)
    with pytest.raises(TrustError) as refused:
        installed.check_in()
    assert refused.value.kind == "expired"
    assert_answers(installed, bundles.v1)


def test_rollback_in_one_entry_refuses_that_model_and_installs_the_others(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    """A pin (or a withdrawal) below the device's floor for one model holds only that model."""
    sim.assignment_overrides["confirmed_release_counter"] = 2
    sim.assign(MODEL, bundles.v2.data)
    installed.check_in()
    sim.assignment_overrides.clear()
    sim.assign(MODEL, bundles.v1.data)  # below the floor of 2 (v2 confirmed)
    sim.assign(OTHER_MODEL, bundles.other.data)
    result = installed.check_in()
    assert {r.model: r.action for r in result.installs} == {
        MODEL: "failed",
        OTHER_MODEL: "installed",
    }
    refused = result.errors[MODEL]
    assert isinstance(refused, TrustError) and refused.kind == "rollback"
    assert refused.model == MODEL and "below 2" in str(refused)
    assert_answers(installed, bundles.v2)
    np.testing.assert_allclose(
        installed.predict(OTHER_MODEL, PROBE)["probabilities"], bundles.other.expected(), rtol=1e-6
    )
    models = installed.status()["models"]
    assert models[MODEL]["version"] == "2.0.0" and "rollback" in models[MODEL]["last_error"]
    assert models[MODEL]["last_install"] == "verify-failed"
    assert models[OTHER_MODEL]["version"] == "1.0.0" and models[OTHER_MODEL]["last_error"] is None
