"""The signature on a webhook delivery: the shape of MLflow's, so receivers reuse their check.

``v1,`` + base64(HMAC-SHA256(secret, ``"{delivery_id}.{timestamp}.{payload}"``)), sent beside the
delivery id and the Unix timestamp of the attempt. Pure: the caller passes the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SCHEME = "v1"
DELIVERY_ID_HEADER = "X-EdgeFleet-Delivery-Id"
TIMESTAMP_HEADER = "X-EdgeFleet-Timestamp"
SIGNATURE_HEADER = "X-EdgeFleet-Signature"
EVENT_HEADER = "X-EdgeFleet-Event"


def sign(secret: str, delivery_id: str, timestamp: int, payload: bytes) -> str:
    """The ``X-EdgeFleet-Signature`` value for one attempt of a delivery."""
    message = f"{delivery_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return f"{SCHEME},{base64.b64encode(digest).decode()}"


def problem(
    secret: str,
    delivery_id: str,
    timestamp: str,
    payload: bytes,
    signature: str,
    *,
    now: float,
    max_age_s: float,
) -> str | None:
    """Why a delivery's signature does not hold, or None when it does.

    ``max_age_s`` bounds how old (or how far ahead) the timestamp may be, against replays; 0 turns
    that check off. A header with several signatures (``v1,a v1,b``, during a secret's rotation)
    holds when any of them does.
    """
    try:
        stamp = int(timestamp)
    except ValueError:
        return f"timestamp {timestamp!r} is not Unix seconds"
    if max_age_s and abs(now - stamp) > max_age_s:
        return f"timestamp {stamp} is {abs(now - stamp):.0f} s from now (at most {max_age_s:g} s)"
    expected = sign(secret, delivery_id, stamp, payload)
    offered = signature.split()
    if not any(o.startswith(f"{SCHEME},") for o in offered):
        return f"no {SCHEME} signature in {signature[:40]!r}"
    if any(hmac.compare_digest(expected, o) for o in offered):
        return None
    return "signature does not match (wrong secret, or the payload, id or timestamp was changed)"
