"""What the rollout API answers (one public model per answer, so OpenAPI types every field)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from server.gates import GateConfig, GateResult, HealthCheck
from server.rollouts import Selector, ShadowPlan, Stage


class VerdictPublic(BaseModel):
    """The gates' verdict: ``advance-ok``, ``fail`` or ``hold``, and every gate's figures."""

    decision: str
    reason: str
    gates: list[GateResult]
    health: list[HealthCheck]
    failed: list[str]


class DecisionFigures(BaseModel):
    """What a decision was taken on (empty for an operator's action)."""

    verdict: VerdictPublic | None = None
    stage: int | None = None
    percent: float | None = None
    devices: dict[str, int] | None = None
    inferences: dict[str, int] | None = None


class DecisionPublic(BaseModel):
    """One entry of the decision log."""

    id: int
    at: datetime
    #: ``evaluator`` (the server's own) or ``operator:NAME``.
    actor: str
    action: str
    #: 1-based stage the rollout was at.
    stage: int
    state_before: str
    state_after: str
    reason: str
    figures: DecisionFigures


class ArmsPublic(BaseModel):
    """Device counts of the current stage: the selected devices and each arm."""

    selected: int
    treatment: int
    control: int


class RolloutPublic(BaseModel):
    id: int
    model: str
    version: str
    state: str
    #: 1-based current stage, and its share of the selected devices.
    stage: int
    percent: float
    selector: Selector
    stages: list[Stage]
    gates: GateConfig
    on_failure: str
    #: A shadow rollout's sampling (docs/rollouts.md, "Shadow runs"); None for a normal one.
    shadow: ShadowPlan | None = None
    #: Per hardware id, the version the control arm stays on (None: nothing was released).
    previous: dict[str, str | None]
    created_by: str
    created_at: datetime
    started_at: datetime | None
    stage_started_at: datetime | None
    finished_at: datetime | None


class RolloutDetail(RolloutPublic):
    arms: ArmsPublic
    #: Newest first (the last ``limit``).
    decisions: list[DecisionPublic]
