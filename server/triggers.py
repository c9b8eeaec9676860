"""Threshold events of webhook subscriptions: drift, negative feedback, accuracy, data quality and
a schedule, checked periodically per model version over a trailing window.

Each condition's state is stored (:class:`~server.models.TriggerState`), so an event fires when a
condition starts to hold and again only after a check found it clear; too little data neither
fires nor clears. :func:`readings` is pure (an aggregate and a manifest in, readings out);
:func:`check_all` reads the data, keeps the states and emits (docs/webhooks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import union
from sqlmodel import Session, col, select

from firmware_bundles.manifest import Manifest
from firmware_bundles.window_builder import UNKNOWN_PREDICTION
from server import drift, metrics, notify, quality, references
from server.errors import ApiError
from server.leases import take_lease
from server.models import UNFOLDED, TelemetryRollup, TelemetryWindowRecord, TriggerState, Webhook
from server.webhooks import Thresholds

LEASE = "threshold-checks"


@dataclass(frozen=True)
class Reading:
    """One condition on one subject at one check; ``holds`` None means too little data."""

    condition: str
    subject: str
    holds: bool | None
    value: float | None
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)


def data_quality_counts(agg: dict[str, Any], manifest: Manifest | None) -> dict[str, int]:
    """``input:NAME:COUNTER`` -> count (:mod:`server.quality`): per input feature ``missing``
    and, by the manifest's histogram kind, ``out_of_range`` (numeric) or ``unseen``
    (categorical); per input ``refused``. Features that saw no values are left out."""
    shown = {h.name: h for h in references.bins(manifest).inputs} if manifest else {}
    figures = quality.data_quality(agg, shown)
    found: dict[str, int] = {}
    for feature in figures["features"]:
        if not feature["values"]:
            continue
        counters = ["missing"]
        if feature["kind"] is not None:
            counters.append("out_of_range" if feature["kind"] == "numeric" else "unseen")
        for counter in counters:
            found[f"input:{feature['name']}:{counter}"] = int(feature[counter])
    for name, count in figures["refused"].items():
        found[f"input:{name}:refused"] = int(count)
    return found


def _drift(agg: dict[str, Any], manifest: Manifest, t: Thresholds) -> Iterator[Reading]:
    refs = manifest.reference_histograms
    for side, histograms in (("inputs", refs.inputs), ("outputs", refs.outputs)):
        for histogram in histograms:
            subject = f"{side[:-1]}:{histogram.name}"
            ours = agg[side].get(histogram.name) or [0] * len(histogram.counts)
            if len(ours) != len(histogram.counts):
                continue  # another bin layout: drift is undefined, not zero
            if sum(ours) < t.drift_min_count or sum(histogram.counts) < 1:
                yield Reading("drift.over_threshold", subject, None, None, t.drift_over)
                continue
            value = getattr(drift.drift(ours, list(histogram.counts)), t.drift_metric)
            extra = {"metric": t.drift_metric, "count": sum(ours)}
            yield Reading(
                "drift.over_threshold", subject, value > t.drift_over, value, t.drift_over, extra
            )


def readings(
    agg: dict[str, Any], manifest: Manifest | None, t: Thresholds, kinds: set[str]
) -> list[Reading]:
    """Every condition of ``kinds`` on one version's aggregate over the window (drift needs the
    manifest's reference histograms)."""
    found: list[Reading] = []
    n = agg["inference_count"]
    if "drift.over_threshold" in kinds and manifest is not None:
        found.extend(_drift(agg, manifest, t))
    if "feedback.over_threshold" in kinds:
        limit = t.negative_feedback_rate_over
        negative = sum(agg["feedback"].get(k, 0) for k in t.negative_kinds)
        rate = negative / n if n >= t.min_inferences else None
        holds = None if rate is None else rate > limit
        extra = {"negative": negative, "kinds": list(t.negative_kinds)}
        found.append(Reading("feedback.over_threshold", "feedback", holds, rate, limit, extra))
    if "accuracy.under_floor" in kinds and t.accuracy_under is not None:
        labels = {p: c for p, c in agg["labels"].items() if p != UNKNOWN_PREDICTION}
        labelled = sum(sum(c.values()) for c in labels.values())
        correct = sum(c.get(p, 0) for p, c in labels.items())
        accuracy = correct / labelled if labelled >= t.min_labels else None
        holds = None if accuracy is None else accuracy < t.accuracy_under
        found.append(
            Reading(
                "accuracy.under_floor",
                "accuracy",
                holds,
                accuracy,
                t.accuracy_under,
                {"labels": labelled},
            )
        )
    if "data_quality.over_threshold" in kinds:
        limit = t.data_quality_rate_over
        for subject, count in sorted(data_quality_counts(agg, manifest).items()):
            rate = count / n if n >= t.min_inferences else None
            holds = None if rate is None else rate > limit
            extra = {"count": count}
            found.append(Reading("data_quality.over_threshold", subject, holds, rate, limit, extra))
    return found


def _state(session: Session, hook_id: int, key: tuple[str, str, str, str]) -> TriggerState | None:
    model, version, condition, subject = key
    return session.exec(
        select(TriggerState).where(
            TriggerState.webhook_id == hook_id,
            TriggerState.model == model,
            TriggerState.version == version,
            TriggerState.condition == condition,
            TriggerState.subject == subject,
        )
    ).first()


def _live_versions(session: Session, since: datetime) -> list[tuple[str, str]]:
    """Model versions with telemetry (rollups, or windows not yet folded) on or after ``since``'s
    day."""
    day = since.date().isoformat()
    folded = select(TelemetryRollup.model, TelemetryRollup.version).where(
        col(TelemetryRollup.day) >= day
    )
    waiting = select(TelemetryWindowRecord.model, TelemetryWindowRecord.version).where(
        UNFOLDED,
        col(TelemetryWindowRecord.window_start)
        >= datetime.combine(since.date(), datetime.min.time(), UTC),
    )
    rows = session.execute(union(folded, waiting)).all()
    return sorted((m, v) for m, v in rows)


def _schedule(session: Session, hook: Webhook, t: Thresholds, now: datetime) -> int:
    assert hook.id is not None and t.schedule_every_s is not None
    key = ("", "", "schedule.due", "")
    state = _state(session, hook.id, key)
    last = state.changed_at if state is not None else hook.created_at
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    if (now - last).total_seconds() < t.schedule_every_s:
        return 0
    if state is None:
        state = TriggerState(
            webhook_id=hook.id,
            model="",
            version="",
            condition="schedule.due",
            subject="",
            changed_at=now,
            checked_at=now,
        )
    state.changed_at = state.checked_at = now
    session.add(state)
    data = {"model": hook.model, "every_s": t.schedule_every_s, "due_at": now.isoformat()}
    notify.emit(session, "schedule.due", data, only_webhook=hook.id, now=now)
    return 1


@dataclass
class _Window:
    """One version's data over one window, read once per check."""

    aggregate: dict[str, Any]
    devices: int
    manifest: Manifest


def check_all(session: Session, *, now: datetime, relative_accuracy: float) -> int:
    """Check every active subscription's threshold conditions; returns events emitted."""
    hooks = [
        h
        for h in session.exec(select(Webhook).where(col(Webhook.active).is_(True))).all()
        if set(h.events) & notify.THRESHOLD_KINDS
    ]
    emitted = 0
    cache: dict[tuple[str, str, int], _Window | None] = {}
    for hook in hooks:
        t = Thresholds.model_validate(hook.thresholds)
        kinds = set(hook.events) & notify.THRESHOLD_KINDS
        if "schedule.due" in kinds:
            emitted += _schedule(session, hook, t, now)
        kinds.discard("schedule.due")
        start = now - timedelta(seconds=t.window_s)
        for model, version in _live_versions(session, start) if kinds else []:
            if hook.model and hook.model != model:
                continue
            key = (model, version, t.window_s)
            if key not in cache:
                cache[key] = _read(session, model, version, start, now, relative_accuracy)
            window = cache[key]
            if window is None:
                continue
            for reading in readings(window.aggregate, window.manifest, t, kinds):
                emitted += _update(session, hook, model, version, reading, window, start, now)
        session.commit()
    return emitted


def _read(
    session: Session,
    model: str,
    version: str,
    start: datetime,
    now: datetime,
    relative_accuracy: float,
) -> _Window | None:
    span = metrics.Span(model, version, None, start, now)
    try:
        collected = metrics.collect(session, span, relative_accuracy)
        manifest = metrics.reference(session, span)
    except ApiError:
        return None  # telemetry of a version the registry no longer has
    total = collected.total
    return _Window(total.aggregate, total.device_count, manifest)


def _update(
    session: Session,
    hook: Webhook,
    model: str,
    version: str,
    reading: Reading,
    window: _Window,
    start: datetime,
    now: datetime,
) -> int:
    """Keep the condition's state; emit when it starts to hold. Returns events emitted."""
    assert hook.id is not None
    state = _state(session, hook.id, (model, version, reading.condition, reading.subject))
    if reading.holds is None:
        if state is not None:
            state.checked_at = now
            session.add(state)
        return 0
    if state is None:
        state = TriggerState(
            webhook_id=hook.id,
            model=model,
            version=version,
            condition=reading.condition,
            subject=reading.subject,
            changed_at=now,
            checked_at=now,
        )
    onset = reading.holds and not state.holding
    if reading.holds != state.holding:
        state.holding, state.changed_at = reading.holds, now
    state.value, state.checked_at = reading.value, now
    session.add(state)
    if not onset:
        return 0
    data = {
        "model": model,
        "version": version,
        "condition": reading.condition,
        "subject": reading.subject,
        "value": reading.value,
        "threshold": reading.threshold,
        "window": {"from": start.isoformat(), "to": now.isoformat()},
        "devices": window.devices,
        "inferences": window.aggregate["inference_count"],
        **reading.extra,
    }
    notify.emit(session, reading.condition, data, only_webhook=hook.id, now=now)
    return 1


def run(session: Session, *, now: datetime, relative_accuracy: float, lease_s: float) -> int:
    """The periodic job: :func:`check_all`, if this process holds the lease."""
    if not take_lease(session, LEASE, now=now, ttl_s=lease_s):
        return 0
    return check_all(session, now=now, relative_accuracy=relative_accuracy)
