"""Webhook subscriptions and the delivery log (admin): docs/webhooks.md."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from server import webhooks
from server.deps import AdminDep, SessionDep, StateDep
from server.schemas import REFUSALS
from server.webhooks import (
    DeliveryPublic,
    WebhookCreated,
    WebhookPublic,
    WebhookRemoved,
    WebhookRequest,
)

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=REFUSALS)


@router.post("/webhooks", status_code=201)
def create_webhook(
    body: WebhookRequest, session: SessionDep, state: StateDep, who: AdminDep
) -> WebhookCreated:
    """Subscribe a URL to events; the secret that signs its deliveries is shown once."""
    allowed = state.settings.webhook_allowed_hosts
    return webhooks.create(session, body, by=who.name, allowed_hosts=allowed)


@router.get("/webhooks")
def list_webhooks(session: SessionDep, who: AdminDep) -> list[WebhookPublic]:
    """Active subscriptions (without their secrets)."""
    return [webhooks.public(h) for h in webhooks.list_active(session)]


@router.get("/webhooks/deliveries")
def list_deliveries(
    session: SessionDep,
    who: AdminDep,
    webhook_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    sink: Literal["webhook", "mlflow"] | None = None,
    state: Literal["pending", "delivered", "failed", "cancelled", "skipped"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeliveryPublic]:
    """The delivery log, newest first: each event on its way to a subscription or to MLflow,
    with its attempts and the last answer."""
    return webhooks.deliveries(session, webhook_id=webhook_id, sink=sink, state=state, limit=limit)


# Only digits match, so DELETE /v1/webhooks/deliveries is a 405, not a malformed id.
@router.delete("/webhooks/{webhook_id:int}")
def remove_webhook(
    webhook_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep, who: AdminDep
) -> WebhookRemoved:
    """Remove a subscription; its pending deliveries are cancelled."""
    return webhooks.remove(session, webhook_id)
