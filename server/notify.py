"""Events: the one place the server records what happened, for webhooks and MLflow to hear.

:func:`emit` writes one outbound row per subscriber (and one for MLflow, where the version's
provenance names an MLflow model version) in the caller's transaction, so an event exists exactly
when the change it reports commits; :mod:`server.outbound` delivers the rows. See
docs/webhooks.md for the kinds and their data.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlmodel import Session, col, select

from firmware_bundles import SchemaError
from firmware_bundles.provenance import MlflowSource
from server.models import ModelVersion, Outbound, Rollout, RolloutDecision, Webhook

log = logging.getLogger("edgefleet.server.notify")

EventKind = Literal[
    "bundle.published",
    "version.released",
    "rollout.started",
    "rollout.advanced",
    "rollout.completed",
    "rollout.gate_failed",
    "rollout.halted",
    "rollout.rolled_back",
    "drift.over_threshold",
    "feedback.over_threshold",
    "accuracy.under_floor",
    "data_quality.over_threshold",
    "schedule.due",
]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
#: Kinds a subscription's thresholds (or schedule) decide; the others report state changes.
THRESHOLD_KINDS = frozenset(
    {
        "drift.over_threshold",
        "feedback.over_threshold",
        "accuracy.under_floor",
        "data_quality.over_threshold",
        "schedule.due",
    }
)
#: Kinds after which MLflow tags are written (a failed gate is followed by its halt or rollback).
MLFLOW_KINDS = frozenset(
    {
        "bundle.published",
        "version.released",
        "rollout.started",
        "rollout.advanced",
        "rollout.completed",
        "rollout.halted",
        "rollout.rolled_back",
    }
)


def _body(event_id: str, kind: str, data: dict[str, Any], now: datetime) -> str:
    """The bytes a webhook delivery sends and signs (fixed once, the same on every retry)."""
    event = {"event_id": event_id, "kind": kind, "occurred_at": now.isoformat(), "data": data}
    return json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)


def emit(
    session: Session,
    kind: str,
    data: dict[str, Any],
    *,
    only_webhook: int | None = None,
    now: datetime | None = None,
) -> str:
    """Queue event ``kind`` for every active subscription that wants it (only ``only_webhook``,
    for an event one subscription's thresholds decided) and, for a model version whose
    provenance names an MLflow model version, for MLflow. The caller commits.

    Returns:
        The event's id (each subscriber's delivery has its own delivery id).
    """
    assert kind in EVENT_KINDS, kind
    now = now or datetime.now(UTC)
    event_id = uuid.uuid4().hex
    body = _body(event_id, kind, data, now)
    query = select(Webhook).where(col(Webhook.active).is_(True))
    if only_webhook is not None:
        query = query.where(Webhook.id == only_webhook)
    for hook in session.exec(query.order_by(col(Webhook.id))):
        if kind not in hook.events or (hook.model and hook.model != data.get("model")):
            continue
        session.add(_row("webhook", kind, event_id, body, now, webhook_id=hook.id))
    if kind in MLFLOW_KINDS and "model" in data and "version" in data:
        ref = mlflow_ref(session, str(data["model"]), str(data["version"]))
        if ref is not None:
            target = {"model": data["model"], "version": data["version"]}
            target |= {"mlflow_name": ref[0], "mlflow_version": ref[1]}
            session.add(_row("mlflow", kind, event_id, json.dumps(target, sort_keys=True), now))
    return event_id


def _row(
    sink: str, kind: str, event_id: str, payload: str, now: datetime, webhook_id: int | None = None
) -> Outbound:
    return Outbound(
        sink=sink,
        webhook_id=webhook_id,
        kind=kind,
        event_id=event_id,
        payload=payload,
        delivery_id=uuid.uuid4().hex,
        created_at=now,
        next_attempt_at=now,
    )


def mlflow_ref(session: Session, model: str, version: str) -> tuple[str, str] | None:
    """The MLflow registered model name and version that ``model`` ``version``'s manifest
    names (``provenance.mlflow.model_name`` and ``.model_version``), or None.

    None for a version without ``provenance.mlflow`` (bundles from before it, or converted from
    files) and for one converted from a ``runs:/`` path, which names no registered version.
    """
    found = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_name == model, ModelVersion.version == version
        )
    ).first()
    entry = (found.provenance or {}).get("mlflow") if found is not None else None
    if entry is None:
        return None
    # Stored from a verified manifest, so it validates; a row that does not names nothing.
    try:
        source = MlflowSource.from_dict(entry)
    except SchemaError:
        log.warning("model %s %s: stored provenance.mlflow does not validate", model, version)
        return None
    if source.model_name is None or source.model_version is None:
        return None
    return source.model_name, source.model_version


def rollout_fields(session: Session, rollout: Rollout) -> dict[str, Any]:
    """What every rollout event says about its rollout."""
    version = session.get(ModelVersion, rollout.version_id)
    return {
        "rollout_id": rollout.id,
        "model": rollout.model_name,
        "version": version.version if version is not None else None,
        "state": rollout.state,
        "stage": rollout.stage + 1,
        "stages": len(rollout.stages),
        "percent": rollout.stages[rollout.stage]["percent"],
    }


def rollout_kinds(decision: RolloutDecision) -> list[str]:
    """The events one logged decision is (none for a hold, a pause or a judged-only run)."""
    if decision.action == "start":
        return ["rollout.started"]
    if decision.action == "advance":
        return ["rollout.advanced"]
    if decision.action == "complete":
        return ["rollout.completed"]
    kinds = []
    if decision.action == "halt":  # only the evaluator halts, and only on a failed gate
        kinds.append("rollout.gate_failed")
    if decision.state_after != decision.state_before:
        if decision.state_after == "halted":
            kinds.append("rollout.halted")
        elif decision.state_after == "rolled-back":
            kinds.append("rollout.rolled_back")
    return kinds


def rollout_decided(session: Session, rollout: Rollout, decision: RolloutDecision) -> None:
    """Emit the events of a decision just logged (the caller commits)."""
    kinds = rollout_kinds(decision)
    if not kinds:
        return
    session.flush()
    data = rollout_fields(session, rollout)
    data |= {"actor": decision.actor, "reason": decision.reason, "decision_id": decision.id}
    for kind in kinds:
        extra = {"figures": decision.figures} if kind == "rollout.gate_failed" else {}
        emit(session, kind, data | extra, now=decision.at)
