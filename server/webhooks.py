"""Webhook subscriptions: who hears which events, under which thresholds; and the delivery log.

A subscription names a URL, event kinds, an optional model, a secret that signs deliveries
(:mod:`firmware_bundles.webhook_signature`) and the thresholds of its threshold events. Deliveries
are :class:`~server.models.Outbound` rows (:mod:`server.notify` writes them,
:mod:`server.outbound` sends them). See docs/webhooks.md.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from server.errors import ApiError
from server.models import Outbound, Webhook
from server.notify import EventKind

#: A tally name as telemetry has it (feedback kinds).
TallyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
DAY_S = 86_400


class Thresholds(BaseModel):
    """When a subscription's threshold events fire (each over the trailing ``window_s``)."""

    model_config = ConfigDict(extra="forbid")

    window_s: int = Field(default=DAY_S, ge=60, le=90 * DAY_S)
    drift_metric: Literal["psi", "js_divergence_bits", "max_abs_proportion_diff"] = "psi"
    drift_over: float = Field(default=0.2, gt=0, le=1000)
    #: Fewer counts than this on either side is no data (neither fires nor clears).
    drift_min_count: int = Field(default=100, ge=1, le=2**31 - 1)
    negative_feedback_rate_over: float = Field(default=0.05, ge=0, le=1)
    negative_kinds: list[TallyName] = Field(
        default_factory=lambda: ["thumbs_down", "negative"], min_length=1, max_length=20
    )
    min_inferences: int = Field(default=100, ge=1, le=2**31 - 1)
    #: Required when subscribed to ``accuracy.under_floor``.
    accuracy_under: float | None = Field(default=None, gt=0, le=1)
    min_labels: int = Field(default=30, ge=1, le=2**31 - 1)
    data_quality_rate_over: float = Field(default=0.01, ge=0, le=1)
    #: Required when subscribed to ``schedule.due``.
    schedule_every_s: int | None = Field(default=None, ge=1, le=365 * DAY_S)


class WebhookRequest(BaseModel):
    """``POST /v1/webhooks``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000, description="http:// or https:// URL.")
    events: list[EventKind] = Field(min_length=1, max_length=20)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    secret: str | None = Field(
        default=None, min_length=16, max_length=200, description="Made up when not given."
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)

    def missing_threshold(self) -> str | None:
        """A threshold an event kind needs and the request lacks (a rule the schema cannot
        state, so a 400 rather than a 422)."""
        if "accuracy.under_floor" in self.events and self.thresholds.accuracy_under is None:
            return "accuracy.under_floor needs thresholds.accuracy_under"
        if "schedule.due" in self.events and self.thresholds.schedule_every_s is None:
            return "schedule.due needs thresholds.schedule_every_s"
        return None


class WebhookPublic(BaseModel):
    id: int
    url: str
    events: list[str]
    model: str | None
    thresholds: Thresholds
    created_by: str
    created_at: datetime
    active: bool


class WebhookCreated(WebhookPublic):
    #: Shown once: it signs every delivery (X-EdgeFleet-Signature).
    secret: str


class WebhookRemoved(BaseModel):
    id: int
    active: bool
    cancelled_deliveries: int


class DeliveryPublic(BaseModel):
    """One outbound row: an event on its way to a subscription or to MLflow."""

    id: int
    delivery_id: str
    event_id: str
    sink: Literal["webhook", "mlflow"]
    webhook_id: int | None
    kind: str
    state: Literal["pending", "delivered", "failed", "cancelled", "skipped"]
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None


def url_problem(url: str, allowed_hosts: list[str] | None) -> str | None:
    """Why ``url`` may not receive deliveries, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        return f"url {url[:80]!r} is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"url {url[:80]!r} must be http:// or https:// with a host"
    if allowed_hosts is not None and parts.hostname not in allowed_hosts:
        return f"host {parts.hostname!r} is not among this server's webhook_allowed_hosts"
    return None


def public(hook: Webhook) -> WebhookPublic:
    assert hook.id is not None
    return WebhookPublic.model_validate(hook, from_attributes=True)


def create(
    session: Session, body: WebhookRequest, *, by: str, allowed_hosts: list[str] | None
) -> WebhookCreated:
    """Store a subscription; its secret is in the answer, once.

    Raises:
        ApiError: 400 for a URL that is not http(s) or names a host the server does not allow,
            or a threshold event without the threshold it needs.
    """
    problem = body.missing_threshold() or url_problem(body.url, allowed_hosts)
    if problem is not None:
        raise ApiError(400, problem)
    secret = body.secret or "whsec_" + secrets.token_urlsafe(32)
    hook = Webhook(
        url=body.url,
        events=sorted(set(body.events)),
        model=body.model,
        secret=secret,
        thresholds=body.thresholds.model_dump(),
        created_by=by,
        created_at=datetime.now(UTC),
    )
    session.add(hook)
    session.commit()
    return WebhookCreated(**public(hook).model_dump(), secret=secret)


def list_active(session: Session) -> list[Webhook]:
    query = select(Webhook).where(col(Webhook.active).is_(True)).order_by(col(Webhook.id))
    return list(session.exec(query))


def remove(session: Session, webhook_id: int) -> WebhookRemoved:
    """Deactivate a subscription and cancel its pending deliveries.

    Raises:
        ApiError: 404 for an unknown or already removed subscription.
    """
    hook = session.get(Webhook, webhook_id)
    if hook is None or not hook.active:
        raise ApiError(404, f"no webhook {webhook_id}")
    hook.active = False
    hook.removed_at = datetime.now(UTC)
    session.add(hook)
    pending = session.exec(
        select(Outbound).where(Outbound.webhook_id == webhook_id, Outbound.state == "pending")
    ).all()
    for row in pending:
        row.state = "cancelled"
        row.last_error = "the subscription was removed"
        session.add(row)
    session.commit()
    return WebhookRemoved(id=webhook_id, active=False, cancelled_deliveries=len(pending))


def deliveries(
    session: Session,
    *,
    webhook_id: int | None,
    sink: str | None,
    state: str | None,
    limit: int,
) -> list[DeliveryPublic]:
    """The delivery log, newest first."""
    query = select(Outbound)
    filters: dict[str, Any] = {"webhook_id": webhook_id, "sink": sink, "state": state}
    for name, value in filters.items():
        if value is not None:
            query = query.where(getattr(Outbound, name) == value)
    rows = session.exec(query.order_by(col(Outbound.id).desc()).limit(limit))
    return [DeliveryPublic.model_validate(r, from_attributes=True) for r in rows]
