"""The rollout bench/seed_fleet.py writes: created by the server's rollout code, then back-dated
so it started ``ROLLOUT_STAGES[0]`` days into the span and advanced to its current stage, with
the evaluator's hourly decisions (gate figures drifting as evidence grows) in its log."""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from sqlmodel import Session, select

from bench import seed_plan as sp
from server import rollouts
from server.gates import GateConfig, GateResult, HealthCheck
from server.models import Rollout, RolloutDecision
from server.rollouts import RolloutPlan, Selector, Stage
from server.state import ServerState


def seed_rollout(session: Session, state: ServerState, plan: sp.Plan) -> Rollout:
    """Create, back-date and log the rollout of :data:`~bench.seed_plan.ROLLOUT_VERSION`."""
    model, version = sp.ROLLOUT_VERSION
    rollout_plan = RolloutPlan(
        model=model,
        version=version,
        selector=Selector(hardware_ids=list(sp.ROLLOUT_HARDWARE)),
        stages=[Stage(percent=p, min_duration_s=2 * 86_400) for p in (5, 25, 50, 100)],
    )
    rollout = rollouts.create(session, rollout_plan, by="operator:seed", catalogue=state.catalogue)
    if rollout.id != plan.rollout_id:
        raise SystemExit(
            f"the rollout got id {rollout.id}, the plan's arms assume {plan.rollout_id}"
        )
    stage_starts = [plan.start + timedelta(days=day, hours=10) for _, day in sp.ROLLOUT_STAGES]
    rollout.created_at = stage_starts[0] - timedelta(hours=1)
    rollout.started_at = stage_starts[0]
    rollout.stage = len(stage_starts) - 1
    rollout.stage_started_at = stage_starts[-1]
    session.add(rollout)
    logged = session.exec(
        select(RolloutDecision).where(RolloutDecision.rollout_id == rollout.id)
    ).all()
    for decision in logged:  # create, then start
        decision.at = rollout.created_at if decision.action == "create" else rollout.started_at
        session.add(decision)
    gates = GateConfig.model_validate(rollout.gates)
    at, hour = stage_starts[0] + timedelta(hours=1), 0
    while at < plan.now:
        stage = sum(1 for s in stage_starts if s <= at) - 1
        percent = sp.ROLLOUT_STAGES[stage][0]
        advancing = (
            stage + 1 < len(stage_starts) and at + timedelta(hours=1) > stage_starts[stage + 1]
        )
        figures = _figures(gates, hour, percent, stage)
        session.add(
            RolloutDecision(
                rollout_id=rollout.id,
                at=at,
                actor="evaluator",
                action="advance" if advancing else "hold",
                stage=stage,
                state_before="running",
                state_after="running",
                reason="every gate passed" if advancing else _holding(at - stage_starts[stage]),
                figures=figures,
            )
        )
        at += timedelta(hours=1)
        hour += 1
    session.commit()
    return rollout


def _holding(in_stage: timedelta) -> str:
    seconds = int(in_stage.total_seconds())
    return f"gates pass; stage minimum duration 172800 s not reached ({seconds} s)"


def _figures(gates: GateConfig, hour: int, percent: float, stage: int) -> dict[str, Any]:
    """Figures as the evaluator logs them; intervals narrow as evidence grows."""
    treatment = int(120 * percent * (1 + hour / 48))
    control = int(treatment * (100 - percent) / percent)
    width = 0.02 / math.sqrt(1 + hour)
    results = []
    for i, name in enumerate(gates.enabled_gates()):
        estimate = 0.001 * math.sin(hour / 7 + i)
        threshold = 0.01
        results.append(
            asdict(
                GateResult(
                    gate=name,
                    status="pass" if estimate + width < threshold else "hold",
                    reason="upper bound below threshold",
                    threshold=threshold,
                    alpha=gates.alpha / len(gates.enabled_gates()),
                    estimate=estimate,
                    lower=estimate - width,
                    upper=estimate + width,
                    treatment_value=0.01 + estimate,
                    control_value=0.01,
                    treatment_devices=treatment,
                    control_devices=control,
                    treatment_inferences=treatment * 900,
                    control_inferences=control * 900,
                )
            )
        )
    health = [
        asdict(
            HealthCheck("sample-ratio", "pass", "arms as expected", percent / 100, percent / 100)
        )
    ]
    return {
        "verdict": {
            "decision": "advance-ok",
            "reason": "every gate passed",
            "gates": results,
            "health": health,
            "failed": [],
        },
        "stage": stage + 1,
        "percent": percent,
        "devices": {"treatment": treatment, "control": control},
        "inferences": {"treatment": treatment * 900, "control": control * 900},
    }
