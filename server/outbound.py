"""Delivering the outbound queue: signed webhook POSTs and MLflow tag writes, at least once.

One process at a time delivers (the lease ``outbound-delivery``). Each round walks the due rows
once in id order; the database is never held while a request is out (SQLite has one
connection). A 2xx delivers; 429, 5xx, timeouts and connection errors are retried with
exponential backoff (a ``Retry-After`` honoured); anything else fails the row, as does a row older
than ``outbound_max_age_s``. After a transient failure, the rest of that destination's rows wait
for the next round rather than each paying a timeout.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from firmware_bundles import webhook_signature as signature
from server import mlflow_tags
from server.config import Settings
from server.leases import take_lease
from server.models import Outbound, Webhook
from server.webhooks import url_problem

log = logging.getLogger("edgefleet.server.outbound")
LEASE = "outbound-delivery"
BATCH = 50
USER_AGENT = "EdgeFleet-Webhooks/0.1"


@dataclass(frozen=True)
class Attempt:
    """What one attempt came to."""

    outcome: str  # "delivered", "retry", "failed", "cancelled" or "skipped"
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


def _answered(response: httpx.Response, error: str | None = None) -> Attempt:
    status = response.status_code
    if response.is_success:
        return Attempt("delivered", status)
    reason = error or response.text[:300] or response.reason_phrase
    if status in (408, 429) or status >= 500:
        after = response.headers.get("Retry-After", "")
        retry_after = float(after) if after.strip().isdigit() else None
        return Attempt("retry", status, f"HTTP {status}: {reason}", retry_after)
    return Attempt("failed", status, f"HTTP {status}: {reason}")


def _unreachable(exc: httpx.HTTPError) -> Attempt:
    return Attempt("retry", None, f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__)


@dataclass(frozen=True)
class _Due:
    """A due row and what its delivery needs, read before any request goes out."""

    id: int
    sink: str
    kind: str
    payload: str
    delivery_id: str
    destination: str
    webhook: Webhook | None = None
    tags: dict[str, str] | None = None
    mlflow: tuple[str, str] | None = None


class Deliverer:
    """The delivery job of one server process."""

    def __init__(self, engine: Engine, settings: Settings, client: httpx.Client | None = None):
        self.engine = engine
        self.settings = settings
        self.client = client or httpx.Client(headers={"User-Agent": USER_AGENT})

    def run(self, now: datetime | None = None) -> int:
        """Deliver what is due, if this process holds the lease; returns rows settled."""
        lease_s = max(60.0, 3 * self.settings.outbound_poll_s)
        with Session(self.engine) as session:
            if not take_lease(session, LEASE, now=now or datetime.now(UTC), ttl_s=lease_s):
                return 0
        deadline = time.monotonic() + lease_s / 2
        blocked: set[str] = set()
        cursor, settled = 0, 0
        while time.monotonic() < deadline:
            due = self._due(cursor, now or datetime.now(UTC))
            if not due:
                break
            for row in due:
                cursor = row.id
                if row.destination in blocked or time.monotonic() >= deadline:
                    continue
                attempt = self._attempt(row)
                if attempt.outcome == "retry":
                    blocked.add(row.destination)
                settled += self._record(row.id, attempt, now or datetime.now(UTC)) != "pending"
        return settled

    def _due(self, cursor: int, now: datetime) -> list[_Due]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(Outbound)
                .where(
                    Outbound.state == "pending",
                    col(Outbound.next_attempt_at) <= now,
                    col(Outbound.id) > cursor,
                )
                .order_by(col(Outbound.id))
                .limit(BATCH)
            ).all()
            return [self._prepare(session, row) for row in rows]

    def _prepare(self, session: Session, row: Outbound) -> _Due:
        assert row.id is not None
        if row.sink == "webhook":
            hook = session.get(Webhook, row.webhook_id)
            if hook is not None:
                session.expunge(hook)
            destination, tags, ref = f"webhook:{row.webhook_id}", None, None
        else:
            target = json.loads(row.payload)
            tags = mlflow_tags.current_tags(
                session,
                target["model"],
                target["version"],
                kind=row.kind,
                public_url=self.settings.public_url,
            )
            hook, destination = None, "mlflow"
            ref = (str(target["mlflow_name"]), str(target["mlflow_version"]))
        return _Due(
            id=row.id,
            sink=row.sink,
            kind=row.kind,
            payload=row.payload,
            delivery_id=row.delivery_id,
            destination=destination,
            webhook=hook,
            tags=tags,
            mlflow=ref,
        )

    def _attempt(self, row: _Due) -> Attempt:
        try:
            if row.sink == "webhook":
                return self._post(row)
            return self._tag(row)
        except httpx.HTTPError as exc:
            return _unreachable(exc)
        except Exception as exc:  # a bug here must not lose the row: retry it, and say so
            log.exception("delivering outbound row %s failed", row.id)
            return Attempt("retry", None, f"internal error: {type(exc).__name__}: {exc}"[:300])

    def _post(self, row: _Due) -> Attempt:
        hook = row.webhook
        if hook is None or not hook.active:
            return Attempt("cancelled", error="the subscription was removed")
        problem = url_problem(hook.url, self.settings.webhook_allowed_hosts)
        if problem is not None:
            return Attempt("failed", error=problem)
        body = row.payload.encode()
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            signature.DELIVERY_ID_HEADER: row.delivery_id,
            signature.TIMESTAMP_HEADER: str(stamp),
            signature.SIGNATURE_HEADER: signature.sign(hook.secret, row.delivery_id, stamp, body),
            signature.EVENT_HEADER: row.kind,
        }
        response = self.client.post(
            hook.url,
            content=body,
            headers=headers,
            timeout=self.settings.outbound_timeout_s,
            follow_redirects=False,
        )
        return _answered(response)

    def _tag(self, row: _Due) -> Attempt:
        uri = self.settings.mlflow_uri
        if not uri:
            return Attempt("skipped", error="this server runs without --mlflow-uri")
        assert row.mlflow is not None and row.tags is not None
        response = mlflow_tags.write_tags(
            self.client,
            uri,
            *row.mlflow,
            row.tags,
            token=self.settings.mlflow_token,
            timeout_s=self.settings.outbound_timeout_s,
        )
        return _answered(response, None if response.is_success else _mlflow_error(response))

    def _record(self, row_id: int, attempt: Attempt, now: datetime) -> str:
        """Write an attempt's outcome into its row; returns the row's state after it."""
        settings = self.settings
        with Session(self.engine) as session:
            row = session.get(Outbound, row_id)
            if row is None or row.state != "pending":
                return "gone"  # a subscription's removal cancelled it meanwhile
            row.attempts += 1
            row.last_attempt_at = now
            row.last_status, row.last_error = attempt.status, attempt.error
            if attempt.outcome == "delivered":
                row.state, row.delivered_at = "delivered", now
            elif attempt.outcome != "retry":
                row.state = attempt.outcome
            elif (now - _aware(row.created_at)).total_seconds() > settings.outbound_max_age_s:
                row.state = "failed"
                row.last_error = f"gave up after {row.attempts} attempts: {attempt.error}"
            else:
                delay = settings.outbound_backoff_base_s * 2 ** min(row.attempts - 1, 30)
                delay = min(delay, settings.outbound_backoff_max_s) * random.uniform(1.0, 1.25)
                if attempt.retry_after_s is not None:
                    delay = max(delay, min(attempt.retry_after_s, settings.outbound_backoff_max_s))
                row.next_attempt_at = now + timedelta(seconds=delay)
            state = row.state
            session.add(row)
            session.commit()
        if attempt.outcome in ("retry", "failed"):
            log.info("outbound %s: %s (%s)", row_id, attempt.outcome, attempt.error)
        return state


def _mlflow_error(response: httpx.Response) -> str:
    return mlflow_tags.error_message(response)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
