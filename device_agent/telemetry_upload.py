"""Telemetry upload: drains the durable outbox through the fleet client, batch by batch.

What happens to a batch is decided here: accepted or a replay, it is forgotten; refused as invalid,
it is dropped and counted; any other failure leaves it pending for the next call.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.client import FleetClient
from device_agent.errors import InvalidRequest
from device_agent.outbox import Outbox
from firmware_bundles.messages import TelemetryBatch


@dataclass(frozen=True)
class UploadResult:
    """What one :func:`upload_pending` call did."""

    batches_sent: int = 0
    windows_sent: int = 0
    replays: int = 0
    rejected_batches: int = 0
    pending_batches: int = 0


def upload_pending(
    outbox: Outbox,
    client: FleetClient,
    device_id: str,
    credential: str,
    *,
    batch_windows: int = 50,
    max_batches: int | None = None,
) -> UploadResult:
    """Send ``device_id``'s batches (its own, or a relayed ring's) until none is left.

    Each batch is stored before it is sent and forgotten only once the server accepts it (or
    recognises it as a replay of one it already has), so nothing is lost to a failed attempt. A
    batch the server refuses as invalid (400, 413, 422: :class:`InvalidRequest`) will never be
    accepted: it is dropped and its windows counted as dropped.

    Raises:
        ServerUnreachable: Connection failed, timed out, or a gateway answered 502-504; the batch
            stays pending for the next call.
        AuthError: The credential was refused (401/403).
        ServerRejected: Any other refusal; the batch stays pending.
        OutboxError: If the outbox cannot be written.
    """
    sent = windows = replays = rejected = 0
    while max_batches is None or sent + rejected < max_batches:
        body = outbox.next_batch_bytes(batch_windows, device_id)
        if body is None:
            break
        batch = TelemetryBatch.from_bytes(body)
        try:
            receipt = client.upload_telemetry(credential, device_id, body)
        except InvalidRequest as exc:
            outbox.reject(batch, f"{exc.status}: {exc.detail}")
            rejected += 1
            continue
        outbox.acknowledge(batch)
        sent += 1
        windows += len(batch.windows)
        replays += receipt.replay
    pending = int(outbox.stats()["pending_batches"])
    return UploadResult(sent, windows, replays, rejected, pending)
