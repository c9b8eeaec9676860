"""The rollout evaluator: gathers each arm's evidence, asks the gates, and moves the rollout.

Windows count by the version they ran: the treatment arm is the new version's windows from the
devices the current stage takes; the control arm is the previous version's windows from the
selected devices it does not take (a treatment device's windows from before it switched count in
neither). Both from the rollout's start in event time; from the 100% stage on, the control is
its data up to the end of the stage before. The device is the unit: one sample per device.

The periodic job (:func:`evaluate_due`) runs in one server process at a time under a lease in
the database (:class:`~server.models.JobLock`); ``POST /v1/rollouts/{id}/evaluate`` runs the same
:func:`evaluate` on demand. Gates decide pass, fail or hold (:mod:`server.gates`); thin data holds
and never rolls back; a stage thin past its deadline waits for a person.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from firmware_bundles.manifest import FirmwareRange
from server import aggregate, gate_config, gates, rollouts, shadow_gates, telemetry
from server.arms import in_treatment
from server.fleet import cohorts_members
from server.leases import take_lease
from server.models import (
    Device,
    Release,
    Rollout,
    RolloutDecision,
    TelemetryWindowRecord,
)
from server.registry import released

log = logging.getLogger("edgefleet.server.evaluator")

EVALUATOR = "evaluator"
#: How far before the rollout's start each device's baseline on the previous version reaches.
BASELINE = timedelta(days=7)
_FAILED_INSTALL = {"self-test-failed", "verify-failed", "download-failed"}


@dataclass
class Arms:
    """The devices of each arm and their samples."""

    treatment: list[gates.DeviceSample]
    control: list[gates.DeviceSample]
    expected_share: float


def selected_devices(session: Session, rollout: Rollout) -> list[Device]:
    """The devices the rollout's selector picks (now: later enrollees join)."""
    selector = rollout.selector
    query = select(Device).where(
        col(Device.hardware_id).in_(selector["hardware_ids"]), col(Device.revoked).is_(False)
    )
    devices = list(session.exec(query.order_by(col(Device.id))))
    members = cohorts_members(session, selector.get("cohorts") or [])
    if members is not None:
        devices = [d for d in devices if d.id in members]
    firmware = FirmwareRange(
        minimum=selector.get("firmware_min", "0.0.0"), below=selector.get("firmware_below")
    )
    return [d for d in devices if firmware.contains(d.firmware_version)]


def selected_ids(session: Session, rollout: Rollout) -> list[str]:
    """The ids of :func:`selected_devices`, read as two columns rather than whole devices (the
    rollout page counts arms over every selected device)."""
    selector = rollout.selector
    # Through the connection: tens of thousands of plain rows, without the ORM's row handling.
    rows = (
        session.connection()
        .execute(
            select(col(Device.id), col(Device.firmware_version))
            .where(
                col(Device.hardware_id).in_(selector["hardware_ids"]),
                col(Device.revoked).is_(False),
            )
            .order_by(col(Device.id))
        )
        .all()
    )
    members = cohorts_members(session, selector.get("cohorts") or [])
    firmware = FirmwareRange(
        minimum=selector.get("firmware_min", "0.0.0"), below=selector.get("firmware_below")
    )
    fits: dict[str, bool] = {}  # a fleet runs few firmware versions: check each once
    for version in {v for _, v in rows}:
        fits[version] = firmware.contains(version)
    return [
        device_id
        for device_id, version in rows
        if fits[version] and (members is None or device_id in members)
    ]


def _install_outcome(device: Device, model: str, version: str) -> bool | None:
    for entry in device.installed or []:
        if entry.get("model") != model:
            continue
        if entry.get("version") == version and entry.get("last_install") in (None, "ok"):
            return True
        if entry.get("last_install") in _FAILED_INSTALL:
            return False
    return None


def arm_windows(
    session: Session,
    model: str,
    versions: dict[str, str],
    start: datetime,
    end: datetime | None,
    relative_accuracy: float,
) -> Iterator[TelemetryWindowRecord]:
    """Every stored window of ``model`` from the devices in ``versions`` (device -> version) on
    the version named for it, with event time in ``[start, end)``, that passes the checks."""
    devices = sorted(versions)
    for i in range(0, len(devices), 500):
        chunk = devices[i : i + 500]
        query = select(TelemetryWindowRecord).where(
            TelemetryWindowRecord.model == model,
            col(TelemetryWindowRecord.device_id).in_(chunk),
            col(TelemetryWindowRecord.window_start) >= start,
        )
        if end is not None:
            query = query.where(col(TelemetryWindowRecord.window_start) < end)
        for w in session.exec(query.order_by(col(TelemetryWindowRecord.id))):
            if versions.get(w.device_id) != w.version:
                continue
            if aggregate.problem(w.aggregate, relative_accuracy) is not None:
                continue
            yield w


@dataclass
class ArmMembers:
    """Who is in each arm of the rollout's current stage, and which version each arm runs."""

    treatment: list[Device]
    control: list[Device]
    new_version: str
    #: Hardware id -> the version its control devices stay on.
    previous_versions: dict[str, str]
    #: The control arm's data ends here (from the 100% stage on), else None.
    control_until: datetime | None


def arm_members(session: Session, rollout: Rollout) -> ArmMembers:
    """The devices of each arm for the rollout's current stage (the evaluator's, and the
    dashboard's treatment-against-control page's)."""
    assert rollout.id is not None
    new = rollouts.version_of(session, rollout.version_id)
    assert new is not None
    stages = rollout.stages
    percent = stages[rollout.stage]["percent"]
    control_percent = percent
    if percent >= 100 and rollout.stage > 0:
        control_percent = stages[rollout.stage - 1]["percent"]
    devices = selected_devices(session, rollout)
    treatment = [d for d in devices if in_treatment(rollout.id, d.id, percent)]
    control = [d for d in devices if not in_treatment(rollout.id, d.id, control_percent)]
    if control_percent != percent:
        # The 100% stage takes every device, the control too: a device is one sample in one arm
        # (the gates refuse it twice), so the treatment is the devices of the stages before.
        in_control = {d.id for d in control}
        treatment = [d for d in treatment if d.id not in in_control]
    previous_versions = {
        h: v.version
        for h, vid in rollout.previous.items()
        if (v := rollouts.version_of(session, vid)) is not None
    }
    control = [d for d in control if d.hardware_id in previous_versions]
    until = rollout.control_until if percent >= 100 else None
    return ArmMembers(treatment, control, new.version, previous_versions, until)


def arms(session: Session, rollout: Rollout, relative_accuracy: float) -> Arms:
    """Each arm's devices and evidence for the rollout's current stage."""
    assert rollout.id is not None and rollout.started_at is not None
    members = arm_members(session, rollout)
    treatment, control = members.treatment, members.control
    previous_versions = members.previous_versions
    percent = rollout.stages[rollout.stage]["percent"]

    def per_device(
        versions: dict[str, str], start: datetime, end: datetime | None
    ) -> dict[str, dict[str, Any]]:
        """Per device, its windows of its arm's version (``versions``: device -> version)."""
        found: dict[str, dict[str, Any]] = {}
        for w in arm_windows(session, rollout.model_name, versions, start, end, relative_accuracy):
            into = found.get(w.device_id)
            if into is None:
                into = found[w.device_id] = aggregate.empty(relative_accuracy)
            aggregate.add(into, w.aggregate)
        return found

    # A shadow rollout's treatment devices still answer with the previous version; their
    # windows of it carry the candidate's shadow counts.
    t_aggs = per_device(
        {
            d.id: previous_versions.get(d.hardware_id, "")
            if rollout.shadow
            else members.new_version
            for d in treatment
        },
        rollout.started_at,
        None,
    )
    c_aggs = per_device(
        {d.id: previous_versions[d.hardware_id] for d in control},
        rollout.started_at,
        members.control_until,
    )
    batches = telemetry.batch_counts(session, [d.id for d in treatment + control])
    # Each device's own week on the previous version before the rollout: a baseline that takes
    # the devices' own spread out of the comparison (CUPED), the same period for both arms.
    everyone = treatment + control
    baselines = per_device(
        {
            d.id: previous_versions[d.hardware_id]
            for d in everyone
            if d.hardware_id in previous_versions
        },
        rollout.started_at - BASELINE,
        rollout.started_at,
    )

    def sample(device: Device, aggs: dict[str, dict[str, Any]], install: bool) -> Any:
        received, expected = batches.get(device.id, (0, 0))
        return gates.DeviceSample(
            device_id=device.id,
            aggregate=aggs.get(device.id) or aggregate.empty(relative_accuracy),
            baseline=baselines.get(device.id),
            install_succeeded=(
                _install_outcome(device, rollout.model_name, members.new_version)
                if install and not rollout.shadow
                else None
            ),
            batches_received=received,
            batches_expected=expected,
        )

    t_samples = [sample(d, t_aggs, True) for d in treatment]
    c_samples = [sample(d, c_aggs, False) for d in control]
    share = percent / 100
    if not 0 < share < 1:
        total = len(t_samples) + len(c_samples)
        share = len(t_samples) / total if total and c_samples and t_samples else 0.5
    return Arms(t_samples, c_samples, share)


def evaluate(
    session: Session, rollout: Rollout, *, now: datetime, relative_accuracy: float, actor: str
) -> RolloutDecision:
    """Judge the rollout's current stage, move it if the gates say so, and log the decision
    with its figures. Only a running rollout moves; any other is judged and logged as it is.
    """
    found = arms(session, rollout, relative_accuracy)
    config = gates.GateConfig.model_validate(rollout.gates)
    candidate = None
    if rollout.shadow:
        # The treatment installs nothing: the candidate runs in its shadow slot.
        config = config.model_copy(update={"install": gate_config.InstallGate(enabled=False)})
        new = rollouts.version_of(session, rollout.version_id)
        candidate = new.version if new is not None else None
    verdict = gates.judge(
        found.treatment, found.control, config, expected_treatment_share=found.expected_share
    )
    verdict = shadow_gates.with_results(
        verdict,
        shadow_gates.judge_extra(
            found.treatment, found.control, config, shadow_candidate=candidate
        ),
    )
    stage = rollout.stages[rollout.stage]
    inferences = {
        arm: sum(s.aggregate["inference_count"] for s in samples)
        for arm, samples in (("treatment", found.treatment), ("control", found.control))
    }
    figures = {
        "verdict": verdict.to_dict(),
        "stage": rollout.stage + 1,
        "percent": stage["percent"],
        "devices": {"treatment": len(found.treatment), "control": len(found.control)},
        "inferences": inferences,
    }
    before = rollout.state
    assert rollout.stage_started_at is not None
    in_stage = (now - rollout.stage_started_at).total_seconds()

    def record(action: str, reason: str, state: str | None = None) -> RolloutDecision:
        """Log the decision, moving the rollout to ``state`` when given."""
        if state is None:
            return rollouts.log(
                session,
                rollout,
                actor=actor,
                action=action,
                before=before,
                reason=reason,
                figures=figures,
            )
        rollouts.move(
            session, rollout, state, actor=actor, action=action, reason=reason, figures=figures
        )
        return _last(session, rollout)

    if before != "running":
        why = f"{verdict.decision}: {verdict.reason}"
        return record("evaluate", f"{rollout.state}: judged, not moved ({why})")
    if verdict.decision == "fail":
        state = "rolled-back" if rollout.on_failure == "rollback" else "halted"
        return record("halt", f"gate failed: {verdict.reason}", state)
    thin = _thin(stage, found, inferences)
    if verdict.decision == "hold" or thin:
        reason = thin or verdict.reason
        if in_stage >= stage["thin_deadline_s"]:
            hours = in_stage / 3600
            return record(
                "wait", f"still thin after {hours:.1f} h: {reason}", "waiting-for-approval"
            )
        return record("hold", reason)
    if in_stage < stage["min_duration_s"]:
        minimum = stage["min_duration_s"]
        return record(
            "hold", f"gates pass; stage minimum duration {minimum} s not reached ({in_stage:.0f} s)"
        )
    if stage["approval"]:
        return record(
            "wait", "gates pass; this stage needs an operator's approval", "waiting-for-approval"
        )
    rollouts.advance(session, rollout, actor=actor, reason="every gate passed", figures=figures)
    if rollout.state == "completed" and not rollout.shadow:
        _release(session, rollout, now)
        rollouts.confirm_for_rollout(session, rollout, by=actor)
    return _last(session, rollout)


def _thin(stage: dict[str, Any], found: Arms, inferences: dict[str, int]) -> str | None:
    for arm, samples in (("treatment", found.treatment), ("control", found.control)):
        reporting = sum(1 for s in samples if s.aggregate["inference_count"] > 0)
        if reporting < stage["min_devices"]:
            return f"{arm}: {reporting} devices reporting, the stage needs {stage['min_devices']}"
        if inferences[arm] < stage["min_inferences"]:
            return f"{arm}: {inferences[arm]} inferences, the stage needs {stage['min_inferences']}"
    return None


def _last(session: Session, rollout: Rollout) -> RolloutDecision:
    session.flush()
    return session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout.id)
        .order_by(col(RolloutDecision.id).desc())
    ).first()  # type: ignore[return-value]


def _release(session: Session, rollout: Rollout, now: datetime) -> None:
    """A completed rollout over whole hardware ids becomes their release."""
    selector = rollout.selector
    whole = not selector.get("cohorts") and selector.get("firmware_min", "0.0.0") == "0.0.0"
    whole = whole and selector.get("firmware_below") is None
    if not whole:
        return  # the rollout keeps offering the version to the devices it selects
    version = rollouts.version_of(session, rollout.version_id)
    assert version is not None
    by = f"rollout {rollout.id}"
    released(session, rollout.model_name, version.version, selector["hardware_ids"], by=by, now=now)
    for h in selector["hardware_ids"]:
        session.add(
            Release(
                model_name=rollout.model_name,
                target_id=h,
                version_id=rollout.version_id,
                released_at=now,
                released_by=by,
            )
        )


# -- the periodic job ---------------------------------------------------------------------------

LEASE = "rollout-evaluator"


def evaluate_due(session: Session, *, relative_accuracy: float, lease_s: float) -> int:
    """Evaluate every running rollout, if this process holds the evaluator's lease; returns
    how many were evaluated."""
    now = datetime.now(UTC)
    if not take_lease(session, LEASE, now=now, ttl_s=lease_s):
        return 0
    done = 0
    for rollout in session.exec(select(Rollout).where(Rollout.state == "running")).all():
        try:
            evaluate(
                session, rollout, now=now, relative_accuracy=relative_accuracy, actor=EVALUATOR
            )
            session.commit()
            done += 1
        except Exception:  # one rollout's trouble must not stop the others
            session.rollback()
            log.exception("evaluating rollout %s failed", rollout.id)
    return done
