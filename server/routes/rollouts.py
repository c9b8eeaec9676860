"""Staged rollouts: create, list, show, evaluate, and the operator's actions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import ValidationError
from sqlmodel import Session, col, select

from server import evaluator, rollouts
from server.arm_counts import arm_counts
from server.deps import OperatorDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.gates import GateConfig
from server.models import Rollout, RolloutDecision
from server.rollout_schemas import (
    ArmsPublic,
    DecisionPublic,
    RolloutDetail,
    RolloutPublic,
)
from server.rollouts import RolloutPlan
from server.schemas import REFUSALS

router = APIRouter(prefix="/v1", tags=["rollouts"], responses=REFUSALS)
#: Rollout ids are the database's 32-bit keys.
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _public(session: Session, rollout: Rollout) -> RolloutPublic:
    assert rollout.id is not None
    version = rollouts.version_of(session, rollout.version_id)
    previous = {
        h: (v.version if (v := rollouts.version_of(session, vid)) is not None else None)
        for h, vid in sorted(rollout.previous.items())
    }
    # The table counts stages from 0; the API from 1.
    return RolloutPublic.model_validate(
        rollout.model_dump()
        | {
            "model": rollout.model_name,
            "version": version.version if version else "?",
            "stage": rollout.stage + 1,
            "percent": rollout.stages[rollout.stage]["percent"],
            "previous": previous,
        }
    )


def decision_public(d: RolloutDecision) -> DecisionPublic:
    assert d.id is not None
    return DecisionPublic.model_validate(
        d.model_dump() | {"stage": d.stage + 1, "figures": d.figures or {}}
    )


def detail(session: Session, rollout: Rollout, limit: int) -> RolloutDetail:
    """A rollout with its arms' device counts and its newest decisions."""
    assert rollout.id is not None
    selected, treated = arm_counts(session, rollout)
    decisions = session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout.id)
        .order_by(col(RolloutDecision.id).desc())
        .limit(limit)
    ).all()
    return RolloutDetail(
        **_public(session, rollout).model_dump(),
        arms=ArmsPublic(selected=selected, treatment=treated, control=selected - treated),
        decisions=[decision_public(d) for d in decisions],
    )


@router.post("/rollouts", status_code=201)
def create_rollout(
    plan: RolloutPlan, session: SessionDep, state: StateDep, who: OperatorDep
) -> RolloutPublic:
    """Create a rollout (running at once unless ``draft``); a bad plan writes nothing."""
    try:
        GateConfig.model_validate(plan.gates)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"gates: {where}: {first['msg']}") from exc
    rollout = rollouts.create(session, plan, by=f"operator:{who.name}", catalogue=state.catalogue)
    return _public(session, rollout)


@router.get("/rollouts")
def list_rollouts(
    session: SessionDep,
    who: ReaderDep,
    model: str | None = None,
    state: str | None = None,
) -> list[RolloutPublic]:
    """Rollouts, newest first, optionally of one model or in one state."""
    query = select(Rollout)
    if model:
        query = query.where(Rollout.model_name == model)
    if state:
        query = query.where(Rollout.state == state)
    return [_public(session, r) for r in session.exec(query.order_by(col(Rollout.id).desc()))]


@router.get("/rollouts/{rollout_id}")
def show_rollout(
    rollout_id: RolloutId,
    session: SessionDep,
    who: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> RolloutDetail:
    """State, stage, arms with device counts, and the newest decisions with their figures."""
    return detail(session, rollouts.get(session, rollout_id), limit)


@router.post("/rollouts/{rollout_id}/evaluate")
def evaluate_rollout(
    rollout_id: RolloutId, session: SessionDep, state: StateDep, who: OperatorDep
) -> DecisionPublic:
    """Run the evaluator on this rollout now (the same code as the periodic job); the decision
    names the operator who asked as its actor."""
    rollout = rollouts.get(session, rollout_id)
    if rollout.state in ("draft", "rolled-back", "completed", "halted"):
        raise ApiError(409, f"rollout {rollout_id} is {rollout.state}: nothing to evaluate")
    decision = evaluator.evaluate(
        session,
        rollout,
        now=datetime.now(UTC),
        relative_accuracy=state.settings.telemetry_relative_accuracy,
        actor=f"operator:{who.name}",
    )
    session.commit()
    return decision_public(decision)


@router.post("/rollouts/{rollout_id}/{action}")
def act_on_rollout(
    rollout_id: RolloutId,
    action: Literal["start", "pause", "resume", "approve", "abort", "rollback", "confirm"],
    session: SessionDep,
    who: OperatorDep,
) -> RolloutPublic:
    """An operator's action; 409 when it does not apply in the rollout's state."""
    rollout = rollouts.act(session, rollout_id, action, by=f"operator:{who.name}")
    return _public(session, rollout)
