"""Staged rollouts: the plan, its checks, the state machine and the decision log.

States: ``draft`` -> ``running`` <-> ``paused``; ``running`` -> ``waiting-for-approval`` (a stage
that needs a person, or evidence thin past its deadline) -> ``running``; ``running`` ->
``halted`` or ``rolled-back`` (a failed gate, or an operator); ``halted`` -> ``rolled-back``;
``running`` -> ``completed`` after the last stage. Every transition, and every evaluation that
holds, is a :class:`~server.models.RolloutDecision` with its actor and figures. The evaluator
(:mod:`server.evaluator`) decides; this module only moves the state and writes the log.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import Session, select

from firmware_bundles.catalogue import TargetCatalogue
from firmware_bundles.manifest import SEMVER_PATTERN, check_semver
from server import confirmations, notify
from server.errors import ApiError
from server.models import Bundle, Cohort, Confirmation, ModelVersion, Rollout, RolloutDecision
from server.offers import current_versions
from server.registry import get_version, owning_rollout

State = Literal[
    "draft", "running", "paused", "waiting-for-approval", "halted", "rolled-back", "completed"
]
Action = Literal["start", "pause", "resume", "approve", "abort", "rollback", "confirm"]
#: From which states each operator action may be taken, and the state it leads to.
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({"draft"}), "running"),
    "pause": (frozenset({"running", "waiting-for-approval"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "approve": (frozenset({"waiting-for-approval"}), "running"),
    "abort": (frozenset({"draft", "running", "paused", "waiting-for-approval"}), "halted"),
    "rollback": (
        frozenset({"running", "paused", "waiting-for-approval", "halted"}),
        "rolled-back",
    ),
}
DAY_S = 86_400


class Stage(BaseModel):
    """One stage: the share of the selected devices in the treatment arm, and what it needs
    before it may advance."""

    model_config = ConfigDict(extra="forbid")

    percent: float = Field(gt=0, le=100)
    min_duration_s: int = Field(default=3 * DAY_S, ge=0)
    min_devices: int = Field(default=3, ge=1, description="in each arm")
    min_inferences: int = Field(default=1000, ge=0, description="in each arm")
    #: A person approves before the rollout moves past this stage.
    approval: bool = False
    #: Evidence still thin this long after the stage began: wait for a person.
    thin_deadline_s: int = Field(default=14 * DAY_S, ge=0)


class Selector(BaseModel):
    """Which devices the rollout covers: all of these that match (an empty list: any)."""

    model_config = ConfigDict(extra="forbid")

    cohorts: list[str] = Field(default_factory=list)
    hardware_ids: list[str] = Field(default_factory=list)
    firmware_min: str = Field(default="0.0.0", pattern=SEMVER_PATTERN)
    firmware_below: str | None = Field(default=None, pattern=SEMVER_PATTERN)

    @model_validator(mode="after")
    def _firmware(self) -> Selector:
        check_semver(self.firmware_min)
        if self.firmware_below is not None:
            check_semver(self.firmware_below)
        return self


class ShadowPlan(BaseModel):
    """A shadow rollout: the treatment arm keeps the previous version answering and runs the
    candidate in its shadow slot on ``sample_fraction`` of the calls (docs/rollouts.md)."""

    model_config = ConfigDict(extra="forbid")

    sample_fraction: float = Field(gt=0, le=1)


class RolloutPlan(BaseModel):
    """``POST /v1/rollouts``: a version, a selector, stages and gates."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    selector: Selector = Field(default_factory=Selector)
    stages: list[Stage] = Field(
        default_factory=lambda: [Stage(percent=p) for p in (5, 25, 100)], min_length=1
    )
    #: Gate settings (see :mod:`server.gates`); defaults when empty.
    gates: dict[str, Any] = Field(default_factory=dict)
    on_failure: Literal["halt", "rollback"] = "rollback"
    draft: bool = False
    #: Run the version in shadow beside the previous one instead of replacing it.
    shadow: ShadowPlan | None = None

    def check_stages(self) -> None:
        """Raises: ApiError 400 unless the percentages increase and end at 100 (a rule the
        request's schema cannot state, so it is the documented refusal, not a 422)."""
        percents = [s.percent for s in self.stages]
        if any(b <= a for a, b in itertools.pairwise(percents)):
            raise ApiError(400, f"stage percentages must increase: {percents}")
        if percents[-1] != 100:
            raise ApiError(400, f"the last stage must be 100%, not {percents[-1]:g}%")


def _now() -> datetime:
    return datetime.now(UTC)


def log(
    session: Session,
    rollout: Rollout,
    *,
    actor: str,
    action: str,
    before: str,
    reason: str,
    figures: dict[str, Any] | None = None,
) -> RolloutDecision:
    """Append a decision and emit its events (the caller commits)."""
    assert rollout.id is not None
    decision = RolloutDecision(
        rollout_id=rollout.id,
        at=_now(),
        actor=actor,
        action=action,
        stage=rollout.stage,
        state_before=before,
        state_after=rollout.state,
        reason=reason,
        figures=figures or {},
    )
    session.add(decision)
    notify.rollout_decided(session, rollout, decision)
    return decision


def create(session: Session, plan: RolloutPlan, *, by: str, catalogue: TargetCatalogue) -> Rollout:
    """Check ``plan`` and store it (running at once unless ``draft``); nothing is written when
    a check fails.

    Raises:
        ApiError: 404 for an unknown version or cohort; 409 for a withdrawn version, one without
            a bundle for a selected hardware id, or another rollout of the model on those
            hardware ids; 400 for an unknown hardware id or stages that do not increase to 100.
            A shadow rollout: 409 where nothing is released to run beside, or where the
            target's flash budget holds no shadow slot for the bundle (naming the bytes).
    """
    catalogue_ids = set(catalogue.targets)
    plan.check_stages()
    version = get_version(session, plan.model, plan.version)
    if version.withdrawn:
        raise ApiError(409, f"{plan.model} {plan.version} is withdrawn")
    for name in plan.selector.cohorts:
        if session.get(Cohort, name) is None:
            raise ApiError(404, f"no cohort {name!r}")
    unknown = sorted(set(plan.selector.hardware_ids) - catalogue_ids)
    if unknown:
        raise ApiError(400, f"unknown hardware id {', '.join(unknown)}")
    built = set(session.exec(select(Bundle.target_id).where(Bundle.version_id == version.id)))
    hardware = sorted(plan.selector.hardware_ids or built)
    missing = sorted(set(hardware) - built)
    if missing or not hardware:
        raise ApiError(
            409,
            f"{plan.model} {plan.version} has no bundle for {', '.join(missing) or 'any target'};"
            f" it has: {', '.join(sorted(built)) or 'none'}",
        )
    owner = owning_rollout(session, plan.model, hardware)
    if owner is not None:
        raise ApiError(
            409,
            f"rollout {owner.id} of {plan.model} ({owner.state}) already covers"
            f" {', '.join(sorted(set(hardware) & set(owner.selector['hardware_ids'])))}",
        )
    previous: dict[str, int | None] = {}
    for h in hardware:
        current = current_versions(session, h).get(plan.model)
        previous[h] = None if current is None else current.id
        if current is not None and current.id == version.id:
            raise ApiError(409, f"{plan.model} {plan.version} is already released for {h}")
    if plan.shadow is not None:
        _check_shadow(session, plan, version.id, previous, catalogue)
    now = _now()
    assert version.id is not None
    rollout = Rollout(
        model_name=plan.model,
        version_id=version.id,
        selector={**plan.selector.model_dump(), "hardware_ids": hardware},
        stages=[s.model_dump() for s in plan.stages],
        gates=plan.gates,
        previous=previous,
        on_failure=plan.on_failure,
        shadow=None if plan.shadow is None else plan.shadow.model_dump(),
        state="draft",
        created_by=by,
        created_at=now,
    )
    session.add(rollout)
    session.flush()
    log(session, rollout, actor=by, action="create", before="draft", reason="created")
    if not plan.draft:
        _start(session, rollout, by)
    session.commit()
    return rollout


def _check_shadow(
    session: Session,
    plan: RolloutPlan,
    version_id: int | None,
    previous: dict[str, int | None],
    catalogue: TargetCatalogue,
) -> None:
    """Raises: ApiError 409 where a shadow cannot run: nothing released on a hardware id, a
    target whose flash budget holds no third slot for the candidate's bundle (with the sizes),
    or a micro target behind the device link, which does not carry shadow candidates yet."""
    bare = sorted(h for h, v in previous.items() if v is None)
    if bare:
        raise ApiError(
            409,
            f"a shadow runs beside the released version; {plan.model} has none on"
            f" {', '.join(bare)}",
        )
    problems, relayed = [], []
    for bundle in session.exec(select(Bundle).where(Bundle.version_id == version_id)):
        if bundle.target_id not in previous:
            continue
        target = catalogue.get(bundle.target_id)
        short = target.shadow_slot_shortfall(bundle.length)
        if short is not None:
            problems.append(
                f"{bundle.target_id}: the shadow slot needs {short[0]} bytes, the flash budget"
                f" has {short[1]} bytes beside the two A/B slots"
            )
        elif target.model_flash_bytes is not None:
            relayed.append(bundle.target_id)
    if problems:
        raise ApiError(409, "no room for a shadow slot: " + "; ".join(sorted(problems)))
    if relayed:
        # The budget holds a third slot, but the device link (SMP over BLE or serial) carries
        # only the A/B image: the firmware would never run the candidate, and the rollout's
        # agreement gate would wait for counts that never come.
        raise ApiError(
            409,
            f"{', '.join(sorted(relayed))}: the flash budget holds a shadow slot, but the device"
            " link does not carry shadow candidates yet (shadows run on phones and boards with"
            " the agent; docs/rollouts.md)",
        )


def get(session: Session, rollout_id: int) -> Rollout:
    """Raises: ApiError 404 for an unknown rollout."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise ApiError(404, f"no rollout {rollout_id}")
    return rollout


def _start(session: Session, rollout: Rollout, by: str) -> None:
    before, now = rollout.state, _now()
    rollout.state, rollout.stage = "running", 0
    rollout.started_at = rollout.stage_started_at = now
    session.add(rollout)
    log(session, rollout, actor=by, action="start", before=before, reason="started at stage 1")


def act(session: Session, rollout_id: int, action: Action, *, by: str) -> Rollout:
    """An operator's action on a rollout.

    Raises:
        ApiError: 404 for an unknown rollout; 409 when the action does not apply in its state.
    """
    rollout = get(session, rollout_id)
    if action == "confirm":
        if rollout.state in ("draft", "rolled-back"):
            raise ApiError(409, f"rollout {rollout_id} is {rollout.state}: nothing to confirm")
        confirm_for_rollout(session, rollout, by=by)
        log(
            session,
            rollout,
            actor=by,
            action="confirm",
            before=rollout.state,
            reason="an operator confirmed the version for the rollout's devices",
        )
        session.commit()
        return rollout
    if action == "rollback" and _confirmed(session, rollout):
        raise ApiError(
            409,
            f"rollout {rollout_id} was confirmed: its devices' anti-rollback floor may be at the"
            " new version, so they would refuse the previous one (docs/rollback.md)",
        )
    allowed, after = TRANSITIONS[action]
    if rollout.state not in allowed:
        raise ApiError(
            409,
            f"rollout {rollout_id} is {rollout.state}; {action} applies to "
            + ", ".join(sorted(allowed)),
        )
    if action == "start":
        _start(session, rollout, by)
    elif action == "approve":
        advance(session, rollout, actor=by, reason="approved by an operator", figures={})
    else:
        move(session, rollout, after, actor=by, action=action, reason=f"{action} by an operator")
    session.commit()
    return rollout


def move(
    session: Session,
    rollout: Rollout,
    state: str,
    *,
    actor: str,
    action: str,
    reason: str,
    figures: dict[str, Any] | None = None,
) -> None:
    """Set the state and log it (the caller commits)."""
    before = rollout.state
    rollout.state = state
    if state in ("halted", "rolled-back", "completed"):
        rollout.finished_at = _now()
    session.add(rollout)
    log(session, rollout, actor=actor, action=action, before=before, reason=reason, figures=figures)


def advance(
    session: Session, rollout: Rollout, *, actor: str, reason: str, figures: dict[str, Any]
) -> None:
    """Move to the next stage, or complete after the last (the caller commits)."""
    before = rollout.state
    if rollout.stage + 1 >= len(rollout.stages):
        move(
            session,
            rollout,
            "completed",
            actor=actor,
            action="complete",
            reason=reason,
            figures=figures,
        )
        return
    now = _now()
    rollout.stage += 1
    rollout.state = "running"
    rollout.stage_started_at = now
    if rollout.stages[rollout.stage]["percent"] >= 100:
        rollout.control_until = now  # no control devices from here: judge against this data
    session.add(rollout)
    log(
        session,
        rollout,
        actor=actor,
        action="advance",
        before=before,
        reason=reason,
        figures=figures,
    )


def version_of(session: Session, version_id: int | None) -> ModelVersion | None:
    return None if version_id is None else session.get(ModelVersion, version_id)


def _confirmed(session: Session, rollout: Rollout) -> bool:
    return (
        session.exec(select(Confirmation).where(Confirmation.rollout_id == rollout.id)).first()
        is not None
    )


def confirm_for_rollout(session: Session, rollout: Rollout, *, by: str) -> None:
    """Confirm the rollout's version for its devices (docs/rollback.md): for every device of its
    hardware ids when it selects them all, else for the devices it selects (the caller commits;
    ``confirm`` commits too)."""
    selector = rollout.selector
    whole = (
        not selector.get("cohorts")
        and selector.get("firmware_min", "0.0.0") == "0.0.0"
        and selector.get("firmware_below") is None
    )
    version = version_of(session, rollout.version_id)
    assert version is not None
    confirmations.confirm(
        session,
        rollout.model_name,
        version.version,
        list(selector["hardware_ids"]),
        by,
        None if whole else rollout.id,
    )
