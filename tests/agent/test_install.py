"""Enrollment, install into slots, self-test and revert, crash safety, and the outcome reported
at the next check-in."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import PAUSE_STEPS
from device_agent.errors import (
    AuthError,
    ConfigError,
    InputError,
    InstallError,
    SelfTestError,
    ServerUnreachable,
    TrustError,
    UnknownModelError,
)
from device_agent.slots import SlotStore
from tests.agent.conftest import MODEL, PROBE, AgentFactory, BuiltBundle, Bundles, assert_answers
from tests.agent.simulator import FleetSimulator
from tests.cases import named_cases


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- enrollment -----------------------------------------------------------------------------


def test_enrolls_once_with_private_credentials(
    make_agent: AgentFactory, sim: FleetSimulator, tmp_path: Path
) -> None:
    agent = make_agent()
    device_id = agent.enroll()
    state = tmp_path / "state"
    assert _mode(state) == 0o700
    assert _mode(state / "credentials.json") == 0o600
    assert _mode(state / "device-id") == 0o600
    restarted = make_agent()
    assert restarted.device_id == device_id and restarted.enroll() == device_id
    enrolls = [r for r in sim.requests if r.path == "/v1/devices/enroll"]
    assert len(enrolls) == 1 and list(sim.devices) == [device_id]
    assert sim.devices[device_id].capabilities.hardware_id == "phone-android"


def test_refused_enrollment_token_is_an_auth_error(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    agent = make_agent(enroll_token="efe_wrong")
    with pytest.raises(AuthError, match="enrollment token is not valid") as refused:
        agent.check_in()
    assert refused.value.status == 401
    assert not (tmp_path / "state" / "credentials.json").exists()


def test_no_token_and_not_enrolled_is_a_config_error(make_agent: AgentFactory) -> None:
    with pytest.raises(ConfigError, match="enroll_token"):
        make_agent(enroll_token=None).enroll()


def test_state_dir_of_another_device_is_refused(make_agent: AgentFactory) -> None:
    make_agent(device_id="phone-1").enroll()
    with pytest.raises(ConfigError, match="belongs to device phone-1"):
        make_agent(device_id="phone-2")


# -- install and report ---------------------------------------------------------------------


def test_update_activates_the_inactive_slot_and_keeps_the_old_one(
    installed: Agent, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    sim.assign(MODEL, bundles.v2.data)
    report = installed.check_in().installs[0]
    assert report.action == "installed" and report.version == "2.0.0"
    assert_answers(installed, bundles.v2)
    model = installed.status()["models"][MODEL]
    assert model["active_slot"] == "b" and model["slots"] == {"a": "standby", "b": "active"}
    assert (tmp_path / "state/models/gesture/a/bundle.efb").read_bytes() == bundles.v1.data
    installed.check_in()
    reported = sim.devices[installed.device_id].check_ins[-1].installed[0]
    assert (reported.version, reported.release_counter, reported.last_install) == ("2.0.0", 2, "ok")


def test_failed_self_test_reverts_and_is_reported_at_the_next_check_in(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    bundle_sha256 = sim.assign(MODEL, bundles.bad_selftest.data)
    error = installed.check_in().errors[MODEL]
    assert isinstance(error, SelfTestError) and "over the tolerance" in error.detail
    assert_answers(installed, bundles.v1)
    report = installed.check_in().installs[0]
    assert report.action == "skipped" and len(sim.downloads(bundle_sha256)) == 1
    reported = sim.devices[installed.device_id].check_ins[-1].installed[0]
    assert reported.version == "1.0.0" and reported.last_install == "self-test-failed"
    assert reported.slots == {"a": "active", "b": "failed"}
    assert reported.last_error is not None and "self-test" in reported.last_error


def test_predict_works_offline_and_checks_its_inputs(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    sim.offline = True
    with pytest.raises(ServerUnreachable):
        installed.check_in()
    assert "ServerUnreachable" in installed.status()["last_error"]
    assert_answers(installed, bundles.v1)
    with pytest.raises(InputError) as bad:
        installed.predict(MODEL, np.zeros((1, 5), np.float32))
    assert (bad.value.input, bad.value.expected, bad.value.got) == (
        "input",
        "4 features per row",
        "5 features per row",
    )
    with pytest.raises(UnknownModelError, match="active: gesture"):
        installed.predict("no-such-model", PROBE)


def test_a_slot_that_cannot_be_written_is_reported_and_v1_keeps_answering(
    installed: Agent, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    blocker = tmp_path / "state/models/gesture/b"
    blocker.write_bytes(b"a file where the slot directory goes")  # the write fails (ENOTDIR)
    sim.assign(MODEL, bundles.v2.data)
    error = installed.check_in().errors[MODEL]
    assert isinstance(error, InstallError) and "slot b" in str(error)
    assert_answers(installed, bundles.v1)
    assert installed.status()["models"][MODEL]["last_error"] == str(error)
    blocker.unlink()
    assert installed.check_in().installs[0].action == "installed"
    assert_answers(installed, bundles.v2)


# -- crash safety: the on-disk state each install step leaves -------------------------------

Step = Callable[[SlotStore, BuiltBundle], None]


def _begin(store: SlotStore, bundle: BuiltBundle) -> None:
    store.begin_install(
        MODEL,
        "b",
        bundle_sha256=bundle.bundle_sha256,
        version=bundle.version,
        release_counter=bundle.release_counter,
        length=len(bundle.data),
    )


def _half_written(store: SlotStore, bundle: BuiltBundle) -> None:
    _begin(store, bundle)
    store.write(MODEL, "b", bundle.data[: len(bundle.data) // 2])


def _written(store: SlotStore, bundle: BuiltBundle) -> None:
    _begin(store, bundle)
    store.write(MODEL, "b", bundle.data)


def _fsynced(store: SlotStore, bundle: BuiltBundle) -> None:
    _written(store, bundle)
    store.sync(MODEL, "b")


def _switched(store: SlotStore, bundle: BuiltBundle) -> None:
    _fsynced(store, bundle)
    store.begin_self_test(MODEL, "b")


def _record_half_replaced(store: SlotStore, bundle: BuiltBundle) -> None:
    _switched(store, bundle)
    (store.root / MODEL / ".slots.json.crash.tmp").write_bytes(b'{"active": "b", "tri')


CRASHES: list[tuple[str, Step, str]] = [
    ("during-write", _half_written, "empty"),
    ("written-not-fsynced", _written, "empty"),
    ("fsynced-not-switched", _fsynced, "empty"),
    ("switched-to-self-test", _switched, "reverted"),
    ("slots-json-replace-interrupted", _record_half_replaced, "reverted"),
]


@pytest.fixture
def state_dir(installed: Agent, tmp_path: Path) -> Path:
    """The state dir of the agent that installed v1, for a test to leave as a crash would."""
    return tmp_path / "state"


@named_cases(("crash", "slot_b"), CRASHES)
def test_a_crash_at_any_step_leaves_the_old_model_answering(
    make_agent: AgentFactory,
    sim: FleetSimulator,
    bundles: Bundles,
    state_dir: Path,
    crash: Step,
    slot_b: str,
) -> None:
    crash(SlotStore(state_dir), bundles.v2)
    restarted = make_agent()
    assert_answers(restarted, bundles.v1)
    assert restarted.status()["models"][MODEL]["slots"] == {"a": "active", "b": slot_b}
    sim.assign(MODEL, bundles.v2.data)  # the interrupted install is retried, and succeeds
    assert restarted.check_in().installs[0].action == "installed"
    assert_answers(restarted, bundles.v2)


def test_activation_recorded_before_the_counters_still_sets_the_rollback_floor(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, state_dir: Path
) -> None:
    store = SlotStore(state_dir)
    _switched(store, bundles.v2)
    store.activate(MODEL, "b")  # crash here: trust.json still says 1 installed
    restarted = make_agent()
    assert_answers(restarted, bundles.v2)
    # v2 confirmed: the floor rises to min(2, installed), so v2 must count as installed.
    sim.assignment_overrides["confirmed_release_counter"] = 2
    sim.assign(MODEL, bundles.v1.data)
    refused = restarted.check_in().errors[MODEL]
    assert isinstance(refused, TrustError) and refused.kind == "rollback"
    assert_answers(restarted, bundles.v2)


def test_a_bundle_whose_self_test_keeps_being_interrupted_is_given_up(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, state_dir: Path
) -> None:
    sim.assign(MODEL, bundles.v2.data)
    for _ in range(2):
        _switched(SlotStore(state_dir), bundles.v2)
        make_agent(max_interrupted_installs=2)
    restarted = make_agent(max_interrupted_installs=2)
    report = restarted.check_in().installs[0]
    assert report.action == "skipped" and "self-test-failed" in report.detail
    assert_answers(restarted, bundles.v1)


# -- the test_pause_at crash-test hook ------------------------------------------------------


def _wait_for(path: Path, thread: threading.Thread, errors: list[BaseException]) -> None:
    for _ in range(600):
        if path.exists() or errors or not thread.is_alive():
            break
        time.sleep(0.05)
    assert not errors, errors
    assert path.exists(), f"the agent never paused at {path.name}"


@pytest.mark.parametrize("step", PAUSE_STEPS)
def test_pause_hook_freezes_at_the_step_and_a_restart_recovers(
    installed: Agent,
    make_agent: AgentFactory,
    sim: FleetSimulator,
    bundles: Bundles,
    tmp_path: Path,
    step: str,
) -> None:
    bundle_sha256 = sim.assign(MODEL, bundles.v3.data)
    frozen = make_agent(test_pause_at=step, close_at_teardown=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            frozen.check_in()
        except BaseException as exc:
            errors.append(exc)

    # The frozen agent sleeps forever in a daemon thread, as a process would until SIGKILL.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    marker = tmp_path / "state" / f"paused-at-{step}"
    _wait_for(marker, thread, errors)
    marker.unlink()

    restarted = make_agent()
    assert_answers(restarted, bundles.v1)
    assert restarted.check_in().installs[0].action == "installed"
    assert_answers(restarted, bundles.v3)
    if step == "download":
        assert sim.downloads(bundle_sha256)[-1].range_start is not None
        assert sim.downloads(bundle_sha256)[-1].range_start > 0
        assert sim.bytes_served(bundle_sha256) < 2 * len(bundles.v3.data)


# -- telemetry through the facade -----------------------------------------------------------


def test_inferences_made_offline_arrive_exactly_once_after_the_server_returns(
    installed: Agent, sim: FleetSimulator
) -> None:
    sim.offline = True
    for _ in range(7):
        installed.predict(MODEL, PROBE)
    with pytest.raises(InputError):
        installed.predict(MODEL, [[1.0, 2.0]])
    installed.feedback(MODEL, "thumbs_down")
    installed.label(MODEL, "tap", predicted="rest")
    sim.clock.advance(3600)  # the window ends
    with pytest.raises(ServerUnreachable):
        installed.upload_telemetry()
    assert installed.status()["outbox"]["pending_batches"] == 1  # kept for the retry
    sim.offline = False
    result = installed.upload_telemetry()
    assert result.batches_sent >= 1 and installed.upload_telemetry().batches_sent == 0
    windows = [w for batch in sim.telemetry for w in batch.windows]
    assert sum(w.inference_count for w in windows) == 8
    assert sum(w.error_count for w in windows) == 1
    assert sum(w.feedback.get("thumbs_down", 0) for w in windows) == 1
    assert sum(w.labels.get("rest", {}).get("tap", 0) for w in windows) == 1
    assert {w.version for w in windows} == {"1.0.0"}
