"""TrustedState on bytes alone, settings and start-up refusals: bad input gets an error naming
the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from device_agent.config import AgentSettings
from device_agent.errors import ConfigError, TrustError
from device_agent.trust import TrustedState
from firmware_bundles import SigningKey, sign_root
from firmware_bundles.messages import AssignedBundle, AssignmentSet
from firmware_bundles.signing import Envelope
from tests.agent.conftest import MODEL, AgentFactory, Bundles
from tests.conftest import NOW, Keys

NONCE = "0" * 32


def _state(root_bytes: bytes, counters: bytes | None = None) -> TrustedState:
    return TrustedState.from_bytes(root_bytes, counters, NOW)


@pytest.mark.parametrize(
    ("make_root", "kind"),
    [
        (lambda keys: b"{not json", "schema"),
        (lambda keys: json.dumps({"signed": {}, "signatures": []}).encode(), "schema"),
        (lambda keys: keys.make_root(signers=keys.release)[1].to_bytes(), "signature"),
        (lambda keys: keys.make_root(signers=[])[1].to_bytes(), "signature"),
    ],
    ids=["not-json", "not-a-root", "signed-by-release-keys", "unsigned"],
)
def test_pinned_root_must_parse_and_be_self_signed(keys: Keys, make_root: Any, kind: str) -> None:
    with pytest.raises(TrustError) as refused:
        _state(make_root(keys))
    assert refused.value.kind == kind and "pinned root" in str(refused.value)


@pytest.mark.parametrize(
    "counters",
    [b"[]", b"{", b'{"release_counters": {"m": -1}}', b'{"release_counters": {"m": "3"}}'],
    ids=["a-list", "not-json", "negative", "a-string"],
)
def test_malformed_release_counters_are_refused(root_bytes: bytes, counters: bytes) -> None:
    with pytest.raises(TrustError, match="release counters") as refused:
        _state(root_bytes, counters)
    assert refused.value.kind == "schema"


def test_release_counters_round_trip_and_only_go_up(root_bytes: bytes) -> None:
    state = _state(root_bytes)
    assert state.record_installed(MODEL, 4) and not state.record_installed(MODEL, 3)
    assert state.release_counter(MODEL) == 0, "an activated version is on trial"
    again = _state(root_bytes, state.counters_to_bytes())
    assert again.counters == state.counters and again.counters.installed == {MODEL: 4}


def test_counters_written_under_the_old_rule_keep_their_floor(root_bytes: bytes) -> None:
    old = b'{"format": 1, "release_counters": {"%s": 3}}' % MODEL.encode()
    state = _state(root_bytes, old)
    assert state.release_counter(MODEL) == 3 and state.counters.installed == {MODEL: 3}


def _next_root(keys: Keys, version: int, signers: list[SigningKey]) -> bytes:
    root, _ = keys.make_root(version=version)
    return sign_root(root, signers).to_bytes()


@pytest.mark.parametrize(
    ("version", "signers", "kind"),
    [(1, "old", "rollback"), (3, "old", "rollback"), (2, "none", "signature")],
    ids=["same-version", "skipped-version", "unsigned"],
)
def test_root_rotation_refusals(
    keys: Keys, root_bytes: bytes, version: int, signers: str, kind: str
) -> None:
    state = _state(root_bytes)
    with pytest.raises(TrustError) as refused:
        state.update_root(_next_root(keys, version, keys.root if signers == "old" else []), NOW)
    assert refused.value.kind == kind and state.root_version == 1


def test_root_rotation_needs_the_new_roots_threshold_too(keys: Keys, root_bytes: bytes) -> None:
    new_key = SigningKey.generate()
    rotated = Keys(root=[new_key], release=keys.release, director=keys.director, hil=keys.hil)
    root, _ = rotated.make_root(version=2)
    state = _state(root_bytes)
    with pytest.raises(TrustError, match="signature threshold"):
        state.update_root(sign_root(root, keys.root).to_bytes(), NOW)  # old keys only
    state.update_root(sign_root(root, [*keys.root, new_key]).to_bytes(), NOW)
    assert state.root_version == 2 and _state(state.root_bytes()).root_version == 2


def _fields(bundles: Bundles, **overrides: Any) -> dict[str, Any]:
    """A valid assignment set for phone-1 as JSON-ready fields, with ``overrides``."""
    entry = AssignedBundle(
        model=MODEL,
        version="1.0.0",
        bundle_sha256=bundles.v1.bundle_sha256,
        bundle_length=len(bundles.v1.data),
        release_counter=1,
        download_url="/v1/bundles/x",
    )
    fields = AssignmentSet(
        device_id="phone-1",
        hardware_id="phone-android",
        nonce=NONCE,
        issued_at=NOW,
        expires_at=NOW.replace(hour=1),
        bundles=[entry],
    ).to_dict()
    fields.update({k: v.isoformat() if k.endswith("_at") else v for k, v in overrides.items()})
    return fields


def _assignment_set(keys: Keys, bundles: Bundles, **overrides: Any) -> bytes:
    return AssignmentSet(**_fields(bundles, **overrides)).sign(keys.director[0]).to_bytes()


def test_verified_assignment_then_bundle_bytes(
    keys: Keys, root_bytes: bytes, bundles: Bundles
) -> None:
    state = _state(root_bytes)
    data = _assignment_set(keys, bundles)
    trusted = state.verify_assignments(
        data, device_id="phone-1", hardware_id="phone-android", nonce=NONCE, now=NOW
    )
    (assignment,) = trusted.assignments
    assert trusted.refused == [] and trusted.next_check_in_s == 3600
    verified = state.verify_bundle(
        bundles.v1.data, assignment, "phone-android", firmware_version="14.0.0", now=NOW
    )
    assert verified.manifest.version == "1.0.0"
    with pytest.raises(TrustError, match="bytes, the assignment says") as short:
        state.verify_bundle(bundles.v1.data[:-1], assignment, "phone-android")
    assert short.value.kind == "mismatch"
    with pytest.raises(TrustError, match=r"firmware 9\.0\.0 is outside") as old_firmware:
        state.verify_bundle(bundles.v1.data, assignment, "phone-android", firmware_version="9.0.0")
    assert old_firmware.value.kind == "target"


@pytest.mark.parametrize(
    ("overrides", "kind", "reason"),
    [
        ({"device_id": "phone-2"}, "wrong-device", "addressed to device phone-2, not phone-1"),
        ({"hardware_id": "ring-gen3"}, "wrong-hardware", "for hardware ring-gen3"),
        ({"nonce": "ab" * 16}, "replay", "nonce differs"),
        ({"expires_at": NOW}, "schema", "expires_at must be after issued_at"),
        ({"next_check_in_s": 0}, "schema", "next_check_in_s"),
    ],
    ids=["wrong-device", "wrong-hardware", "replay", "expiry-before-issue", "no-wait"],
)
def test_a_set_for_another_device_or_check_in_is_refused_whole(
    keys: Keys, root_bytes: bytes, bundles: Bundles, overrides: Any, kind: str, reason: str
) -> None:
    fields = _fields(bundles, **overrides)
    data = Envelope(signed=fields)
    data.sign(keys.director[0])
    with pytest.raises(TrustError, match=reason) as refused:
        _state(root_bytes).verify_assignments(
            data.to_bytes(), device_id="phone-1", hardware_id="phone-android", nonce=NONCE, now=NOW
        )
    assert refused.value.kind == kind and refused.value.model is None


def test_an_entry_below_its_floor_is_refused_alone(
    keys: Keys, root_bytes: bytes, bundles: Bundles
) -> None:
    state = _state(root_bytes, b'{"release_counters": {"%s": 2}}' % MODEL.encode())
    fields = _fields(bundles)
    fields["bundles"].append({**fields["bundles"][0], "model": "keyword", "release_counter": 0})
    data = AssignmentSet(**fields).sign(keys.director[0]).to_bytes()
    trusted = state.verify_assignments(
        data, device_id="phone-1", hardware_id="phone-android", nonce=NONCE, now=NOW
    )
    assert [a.model for a in trusted.assignments] == ["keyword"]
    ((assignment, refused),) = trusted.refused
    assert assignment.model == MODEL and refused.kind == "rollback" and refused.model == MODEL
    assert "release counter 1 is below 2" in refused.reason


# -- settings --------------------------------------------------------------------------------

BASE = {
    "server_url": "https://fleet.simulator",
    "state_dir": "/tmp/state",
    "root_path": "/tmp/root.json",
    "hardware_id": "phone-android",
}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"stall_timeout_s": 0}, "stall_timeout_s"),
        ({"check_in_jitter": 1.0}, "check_in_jitter"),
        ({"max_download_attempts": 0}, "max_download_attempts"),
        ({"backoff_initial_s": 10, "backoff_max_s": 1}, "backoff_max_s"),
        ({"test_pause_at": "halfway"}, "test_pause_at"),
        ({"telemetry_window_s": 90_000}, "telemetry_window_s"),
        ({"stall_timeout": 5}, "stall_timeout"),
    ],
    ids=[
        "zero-stall",
        "jitter-1",
        "no-attempts",
        "backoff-max-below",
        "bad-step",
        "window",
        "typo",
    ],
)
def test_bad_settings_name_the_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        AgentSettings(**{**BASE, **override})


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_STALL_TIMEOUT_S", "5")
    monkeypatch.setenv("EDGEFLEET_AGENT_UNMETERED_ONLY", "true")
    settings = AgentSettings(**BASE)  # type: ignore[arg-type]
    assert settings.stall_timeout_s == 5.0 and settings.unmetered_only is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hardware_id": "toaster"}, "unknown target 'toaster'"),
        ({"root_path": Path("/nonexistent/root.json")}, "pinned root /nonexistent/root.json"),
    ],
    ids=["unknown-target", "missing-root"],
)
def test_agent_refuses_to_start_misconfigured(
    make_agent: AgentFactory, override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_agent(**override)
