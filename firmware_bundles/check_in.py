"""The check-in answer's bytes, built fast for the server's hot path.

Every device calls check-in on a timer, so the server builds the director-signed
:class:`~firmware_bundles.messages.AssignmentSet` envelope here without validating the set as a
whole (the entries are validated :class:`~firmware_bundles.messages.AssignedBundle` documents).
The bytes equal ``AssignmentSet(...).sign(key).to_bytes()``;
``tests/test_check_in_answer_bytes.py`` proves it on many random sets, so a field added to the
model must be added here too.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from firmware_bundles.messages import AssignedBundle
from firmware_bundles.signing import SigningKey, canonical_json

try:  # the server's (its `server` extra): a twentieth of json's time for the signed set
    import orjson
except ImportError:  # pragma: no cover - the device side builds no answers
    orjson = None  # type: ignore[assignment]


def _timestamp(value: datetime) -> str:
    """A UTC timestamp spelled as the models serialise it (ISO 8601, ``Z``)."""
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (UTC)")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _entry(bundle: AssignedBundle) -> dict[str, object]:
    # Read field by field: a quarter of what model_dump costs on the hot path.
    entry: dict[str, object] = {
        "bundle_length": bundle.bundle_length,
        "bundle_sha256": bundle.bundle_sha256,
        "download_url": bundle.download_url,
        "model": bundle.model,
        "release_counter": bundle.release_counter,
        "version": bundle.version,
    }
    # Left out when nothing is confirmed, as the model serialises it (docs/check-in.md).
    if bundle.confirmed_release_counter is not None:
        entry["confirmed_release_counter"] = bundle.confirmed_release_counter
    # Left out when there is no shadow candidate (docs/rollouts.md, "Shadow runs").
    if bundle.shadow is not None:
        entry["shadow"] = bundle.shadow.to_dict()
    return entry


def check_in_answer(
    key: SigningKey,
    *,
    device_id: str,
    hardware_id: str,
    nonce: str,
    issued_at: datetime,
    expires_at: datetime,
    bundles: Iterable[AssignedBundle],
    withheld: Mapping[str, str],
    next_check_in_s: int,
) -> bytes:
    """The canonical bytes of the envelope of this assignment set, signed by the director
    ``key``: the whole body of a check-in answer.

    The caller is the server, which builds the values from its own state; a device checks them
    all with :func:`~firmware_bundles.messages.verify_assignments`.
    """
    entries = [_entry(b) for b in bundles]
    signed = _canonical(
        {
            "_type": "assignments",
            "bundles": entries,
            "device_id": device_id,
            "expires_at": _timestamp(expires_at),
            "hardware_id": hardware_id,
            "issued_at": _timestamp(issued_at),
            "next_check_in_s": next_check_in_s,
            "nonce": nonce,
            "withheld": dict(withheld),
        },
        floats=any("shadow" in e for e in entries),
    )
    # Canonical JSON of {"signatures": [...], "signed": ...}: keys in sorted order, the signed
    # bytes reused as they are (key ids are hex and signatures base64: nothing to escape).
    return b"".join(
        (
            b'{"signatures":[{"keyid":"',
            key.keyid.encode("ascii"),
            b'","sig":"',
            base64.b64encode(key.sign(signed)),
            b'"}],"signed":',
            signed,
            b"}",
        )
    )


def _canonical(value: dict[str, object], *, floats: bool) -> bytes:
    """:func:`~firmware_bundles.signing.canonical_json` of the set. Without floats (a shadow
    entry's ``sample_fraction`` is the set's only one) orjson writes the same bytes: keys sorted,
    no whitespace, UTF-8 unescaped, the same escapes; it spells some floats otherwise (``1e-7``
    where Python writes ``1e-07``), and refuses what canonical JSON refuses, which then raises
    as canonical JSON raises it."""
    if orjson is not None and not floats:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a lone surrogate, an integer past 64 bits: as canonical JSON says
            pass
    return canonical_json(value)
