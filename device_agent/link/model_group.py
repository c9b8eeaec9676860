"""The SMP model group (65): command ids, error codes and message classes.

Shared by the client (:mod:`device_agent.link.client`) and the emulated devices (``hil``); the
wire format is specified for firmware and app authors in ``docs/device-protocol.md``. Messages
are :mod:`smp` message classes, so their CBOR bodies are validated by pydantic on both ends.
"""

from __future__ import annotations

from enum import IntEnum, unique
from typing import Any

import cbor2
from pydantic import BaseModel, ConfigDict, Field
from smp import header as smpheader
from smp import message
from smp.error import MGMT_ERR

#: SMP user groups start at 64; 64 is Intercreate's upload group in the ``smp`` package.
MODEL_GROUP_ID = 65
PROTOCOL_VERSION = 1


@unique
class ModelCommand(IntEnum):
    """Command ids of the model group."""

    IDENTITY = 0
    SLOTS = 1
    UPLOAD = 2
    ACTIVATE = 3
    SELF_TEST = 4
    TELEMETRY_READ = 5
    TELEMETRY_ACK = 6
    INFER = 7


@unique
class ModelRc(IntEnum):
    """Error codes of the model group (``{"err": {"group": 65, "rc": ...}}``)."""

    UNKNOWN = 1
    TOO_LARGE = 2
    BAD_REQUEST = 3
    NO_BUNDLE = 4
    HASH_MISMATCH = 5
    SIGNATURE = 6
    WRONG_DEVICE = 7
    WRONG_HARDWARE = 8
    NONCE = 9
    EXPIRED = 10
    ROLLBACK = 11
    BUNDLE_INVALID = 12
    DOES_NOT_FIT = 13
    SELFTEST_FAILED = 14
    NO_MODEL = 15
    BAD_INPUT = 16
    BUSY = 17
    NO_SESSION = 18
    FLASH = 19


SLOT_STATES = (
    "empty",
    "uploading",
    "uploaded",
    "corrupt",
    "testing",
    "active",
    "standby",
    "failed",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotInfo(_Strict):
    """One slot as ``slots`` reports it."""

    slot: int
    state: str
    model: str | None = None
    version: str | None = None
    sha: bytes | None = None
    len: int | None = None
    release_counter: int | None = None
    off: int | None = None


class TelemetryEntry(_Strict):
    """One sealed telemetry window piece: its sequence number and the window's fields."""

    seq: int
    window: dict[Any, Any]


class Tensor(_Strict):
    """A tensor on the wire: dtype name, shape, little-endian row-major bytes."""

    dtype: str
    shape: list[int]
    data: bytes


class _Group:
    _GROUP_ID = MODEL_GROUP_ID


#: Requests are validated strictly on the device: a text where bytes belong is refused, not
#: converted, as a C decoder would refuse it.
_STRICT_REQUEST = ConfigDict(extra="forbid", frozen=True, strict=True)


class _ReadRequest(message.ReadRequest):
    model_config = _STRICT_REQUEST


class _WriteRequest(message.WriteRequest):
    model_config = _STRICT_REQUEST


class IdentityRequest(_Group, _ReadRequest):
    """Who the device is, and a fresh nonce for its check-in."""

    _COMMAND_ID = ModelCommand.IDENTITY


class IdentityResponse(_Group, message.ReadResponse):
    _COMMAND_ID = ModelCommand.IDENTITY

    device_id: str
    hardware_id: str
    firmware_version: str
    nonce: str
    boot_epoch: int
    protocol: int
    max_bundle_bytes: int
    ram_arena_bytes: int


class SlotsRequest(_Group, _ReadRequest):
    """Both slots' states, the running slot and the stored release counters."""

    _COMMAND_ID = ModelCommand.SLOTS


class SlotsResponse(_Group, message.ReadResponse):
    _COMMAND_ID = ModelCommand.SLOTS

    slots: list[SlotInfo]
    active: int | None = None
    confirmed: bool = False
    counters: dict[str, int] = Field(default_factory=dict)


class UploadRequest(_Group, _WriteRequest):
    """A chunk of a bundle for the inactive slot; ``len`` and ``sha`` at offset 0."""

    _COMMAND_ID = ModelCommand.UPLOAD

    off: int
    data: bytes
    len: int | None = None
    sha: bytes | None = None


class UploadResponse(_Group, message.WriteResponse):
    _COMMAND_ID = ModelCommand.UPLOAD

    off: int
    match: bool | None = None


class ActivateRequest(_Group, _WriteRequest):
    """Activate the uploaded bundle under a director-signed assignment envelope."""

    _COMMAND_ID = ModelCommand.ACTIVATE

    assignment: bytes


class ActivateResponse(_Group, message.WriteResponse):
    _COMMAND_ID = ModelCommand.ACTIVATE

    slot: int
    model: str
    #: ``version`` is taken by the SMP header's protocol version in ``smp``'s messages.
    model_version: str
    release_counter: int
    state: str


class SelfTestRequest(_Group, _WriteRequest):
    """Run the running model's self-test vectors; confirm or revert a ``testing`` slot."""

    _COMMAND_ID = ModelCommand.SELF_TEST


class SelfTestResponse(_Group, message.WriteResponse):
    _COMMAND_ID = ModelCommand.SELF_TEST

    slot: int
    passed: bool
    vectors: int
    worst_error: float
    state: str


class TelemetryReadRequest(_Group, _ReadRequest):
    """Seal the open windows and read the oldest unacknowledged pieces."""

    _COMMAND_ID = ModelCommand.TELEMETRY_READ

    max: int | None = None


class TelemetryReadResponse(_Group, message.ReadResponse):
    _COMMAND_ID = ModelCommand.TELEMETRY_READ

    boot_epoch: int
    windows: list[TelemetryEntry]
    more: bool


class TelemetryAckRequest(_Group, _WriteRequest):
    """Forget the window pieces up to ``upto`` (the client has stored them)."""

    _COMMAND_ID = ModelCommand.TELEMETRY_ACK

    upto: int


class TelemetryAckResponse(_Group, message.WriteResponse):
    _COMMAND_ID = ModelCommand.TELEMETRY_ACK

    pending: int


class InferRequest(_Group, _WriteRequest):
    """Run the active model once (rigs and diagnostics)."""

    _COMMAND_ID = ModelCommand.INFER

    inputs: dict[str, Tensor]


class InferResponse(_Group, message.WriteResponse):
    _COMMAND_ID = ModelCommand.INFER

    outputs: dict[str, Tensor]
    latency_us: int
    arena_bytes: int


def encode_error(request: smpheader.Header, rc: int, reason: str = "") -> bytes:
    """The frame refusing ``request``: ``{"err": {"group", "rc"}, "rsn"}`` (SMP version 2)."""
    body: dict[str, Any] = {"err": {"group": int(request.group_id), "rc": int(rc)}}
    if reason:
        body["rsn"] = reason
    return _frame(request, body)


def encode_unsupported(request: smpheader.Header) -> bytes:
    """The standard answer to an unknown group or command: ``{"rc": 8}`` (MGMT_ERR_ENOTSUP)."""
    return _frame(request, {"rc": int(MGMT_ERR.ENOTSUP)})


def _frame(request: smpheader.Header, body: dict[str, Any]) -> bytes:
    data = cbor2.dumps(body, canonical=True)
    header = smpheader.Header(
        op=smpheader.OP(int(request.op) + 1),
        version=request.version,
        flags=smpheader.Flag(0),
        length=len(data),
        group_id=request.group_id,
        sequence=request.sequence,
        command_id=request.command_id,
    )
    return bytes(header) + data


#: Request class -> its success response class, for both ends.
RESPONSES: dict[type[message.Request], type[message.Response]] = {
    IdentityRequest: IdentityResponse,
    SlotsRequest: SlotsResponse,
    UploadRequest: UploadResponse,
    ActivateRequest: ActivateResponse,
    SelfTestRequest: SelfTestResponse,
    TelemetryReadRequest: TelemetryReadResponse,
    TelemetryAckRequest: TelemetryAckResponse,
    InferRequest: InferResponse,
}

#: Command id -> request class, for the device's dispatcher.
REQUESTS: dict[int, type[message.Request]] = {int(cls._COMMAND_ID): cls for cls in RESPONSES}


def rc_name(group: int, rc: int) -> str:
    """A readable name for an error code of ``group`` (model group or SMP's general codes)."""
    try:
        return ModelRc(rc).name if group == MODEL_GROUP_ID else MGMT_ERR(rc).name
    except ValueError:
        return f"rc={rc}"
