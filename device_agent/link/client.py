"""The SMP client for rings and boards: OS and image groups, and the model group (65).

A :class:`DeviceClient` is handed a :class:`~device_agent.link.transport.DeviceLink` and never
builds one. Requests are matched to responses by order and sequence number, so several may be
in flight (uploads keep up to the device's ``buf_count``). After a :class:`LinkTimeout` the
link's state is unknown: close it and open it again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import cbor2
from pydantic import ValidationError
from smp import header as smpheader
from smp import image_management as smpimg
from smp import message
from smp import os_management as smpos
from smp.exceptions import SMPMalformed

from device_agent.link import model_group as mg
from device_agent.link.config import LinkSettings
from device_agent.link.errors import DeviceRejected, LinkTimeout, ProtocolError
from device_agent.link.upload import (
    ProgressHook,
    RequestFactory,
    UploadResult,
    pipelined_upload,
)

if TYPE_CHECKING:
    import numpy as np

    from device_agent.link.transport import DeviceLink
    from firmware_bundles.messages import TelemetryWindow

R = TypeVar("R", bound=message.Response)

#: Success response class per request class, for the standard groups we use.
_STANDARD: dict[type[message.Request], type[message.Response]] = {
    smpos.EchoWriteRequest: smpos.EchoWriteResponse,
    smpos.MCUMgrParametersReadRequest: smpos.MCUMgrParametersReadResponse,
    smpos.ResetWriteRequest: smpos.ResetWriteResponse,
    smpimg.ImageUploadWriteRequest: smpimg.ImageUploadWriteResponse,
    smpimg.ImageStatesReadRequest: smpimg.ImageStatesReadResponse,
    smpimg.ImageStatesWriteRequest: smpimg.ImageStatesWriteResponse,
}


@dataclass(frozen=True)
class Parameters:
    """The device's MCUmgr buffer parameters."""

    buf_size: int
    buf_count: int


@dataclass(frozen=True)
class TelemetryRead:
    """Window pieces read from a device, with the keys that make their upload idempotent."""

    boot_epoch: int
    windows: list[tuple[int, TelemetryWindow]]
    more: bool


@dataclass(frozen=True)
class InferResult:
    """One inference on the device."""

    outputs: dict[str, np.ndarray]
    latency_us: int
    arena_bytes: int


@dataclass
class _Outstanding:
    sequence: int
    response: type[message.Response]
    request: message.Request


class DeviceClient:
    """Talks SMP to one device over one link.

    Args:
        link: An unopened link; :meth:`connect` opens it.
        settings: Timeouts and pipelining.
    """

    def __init__(self, link: DeviceLink, settings: LinkSettings | None = None) -> None:
        self.link = link
        self.settings = settings or LinkSettings()
        self.parameters = Parameters(buf_size=0, buf_count=1)
        self._outstanding: deque[_Outstanding] = deque()
        #: Answers to requests sent before a reconnect, skipped.
        self.stale_responses = 0
        #: Requests that were never answered while later ones were.
        self.lost_requests = 0

    async def connect(self) -> Parameters:
        """Open the link and size frames from the device's MCUmgr parameters.

        Raises:
            Disconnected: If the link cannot be opened.
            LinkTimeout, DeviceRejected: If the device does not report its parameters.
        """
        self._outstanding.clear()
        await self.link.open()
        response = await self.request_as(
            smpos.MCUMgrParametersReadRequest(), "os.params", self.settings.request_timeout_s
        )
        assert isinstance(response, smpos.MCUMgrParametersReadResponse)
        self.parameters = Parameters(response.buf_size, max(1, response.buf_count))
        self.link.set_buffer_size(response.buf_size)
        return self.parameters

    async def close(self) -> None:
        """Close the link; outstanding requests are forgotten."""
        self._outstanding.clear()
        await self.link.close()

    async def __aenter__(self) -> DeviceClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- request machinery -------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._outstanding)

    async def send_request(self, request: message.Request) -> None:
        """Send ``request`` without waiting; :meth:`next_response` collects answers in order."""
        response = mg.RESPONSES.get(type(request)) or _STANDARD.get(type(request))
        if response is None:
            raise TypeError(f"no response class known for {type(request).__name__}")
        self._outstanding.append(_Outstanding(request.header.sequence, response, request))
        await self.link.send(request.BYTES)

    async def next_response(
        self, command: str, timeout_s: float, *, drain_on_error: bool = False
    ) -> message.Response:
        """The answer to the oldest outstanding request (or a later one, if it was lost).

        Raises:
            LinkTimeout: If it does not come within ``timeout_s``.
            ProtocolError: If it is not a valid answer to that request.
            DeviceRejected: If the device refused the request.
        """
        if not self._outstanding:
            raise ProtocolError(f"{command}: no request outstanding", self.link.name)
        expected = self._outstanding.popleft()
        try:
            async with asyncio.timeout(timeout_s):
                frame, answered = await self._receive_for(expected, command)
        except TimeoutError as exc:
            raise LinkTimeout(command, timeout_s, self.link.name) from exc
        try:
            return self._parse(frame, answered, command)
        except DeviceRejected:
            if drain_on_error:
                await self._drain(command, timeout_s)
            raise

    async def _receive_for(
        self, expected: _Outstanding, command: str
    ) -> tuple[bytes, _Outstanding]:
        """The next frame answering ``expected`` or a later outstanding request.

        Answers to requests sent before a reconnect (a serial line keeps what the device wrote)
        match nothing outstanding and are skipped. An answer to a later request means the
        earlier ones were lost (a frame the device dropped on a bad CRC): they are forgotten
        and the later answer returned with its request.
        """
        wanted = _key(expected.request.header)
        while True:
            frame = await self.link.receive()
            if len(frame) < smpheader.Header.SIZE:
                raise ProtocolError(f"{command}: short frame of {len(frame)} bytes", self.link.name)
            got = _key(smpheader.Header.loads(frame[: smpheader.Header.SIZE]))
            if got == wanted:
                return frame, expected
            later = [_key(o.request.header) for o in self._outstanding]
            if got in later:
                skipped = later.index(got)
                self.lost_requests += 1 + skipped
                for _ in range(skipped):
                    self._outstanding.popleft()
                return frame, self._outstanding.popleft()
            self.stale_responses += 1

    async def request_as(
        self, request: message.Request, command: str, timeout_s: float
    ) -> message.Response:
        """Send ``request`` and wait for its answer (see :meth:`next_response`)."""
        await self.send_request(request)
        return await self.next_response(command, timeout_s)

    async def _drain(self, command: str, timeout_s: float) -> None:
        while self._outstanding:
            try:
                await self.next_response(command, timeout_s)
            except DeviceRejected:
                continue

    def _parse(self, frame: bytes, expected: _Outstanding, command: str) -> message.Response:
        header = smpheader.Header.loads(frame[: smpheader.Header.SIZE])
        try:
            body = cbor2.loads(frame[smpheader.Header.SIZE :])
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise ProtocolError(f"{command}: body is not CBOR: {exc}", self.link.name) from exc
        if not isinstance(body, dict):
            raise ProtocolError(f"{command}: body is not a CBOR map", self.link.name)
        _raise_if_refused(body, int(header.group_id), int(header.command_id), self.link.name)
        try:
            return expected.response.loads(frame)
        except (ValidationError, SMPMalformed, TypeError) as exc:
            raise ProtocolError(f"{command}: malformed answer: {exc}", self.link.name) from exc

    # --- OS and image groups -------------------------------------------------------------

    async def echo(self, text: str) -> str:
        """Echo ``text`` through the device (OS group, command 0)."""
        response = await self.request_as(
            smpos.EchoWriteRequest(d=text), "os.echo", self.settings.request_timeout_s
        )
        return str(getattr(response, "r", ""))

    async def reset(self) -> None:
        """Restart the device (OS group, command 5); the link usually drops afterwards."""
        await self.request_as(
            smpos.ResetWriteRequest(), "os.reset", self.settings.request_timeout_s
        )

    async def upload_firmware(
        self, image: bytes, *, slot: int = 1, on_progress: ProgressHook | None = None
    ) -> UploadResult:
        """Upload a firmware image (image group), pipelined and resumable by SHA-256."""
        image_sha256 = hashlib.sha256(image).digest()

        def make(off: int, data: bytes, first: bool) -> message.WriteRequest:
            if first:
                return smpimg.ImageUploadWriteRequest(
                    off=off, data=data, image=0, len=len(image), sha=image_sha256, upgrade=False
                )
            return smpimg.ImageUploadWriteRequest(off=off, data=data)

        return await self._upload(image, image_sha256, make, "image.upload", on_progress)

    async def firmware_states(self) -> list[smpimg.ImageState]:
        """The image slots as the bootloader sees them."""
        response = await self.request_as(
            smpimg.ImageStatesReadRequest(), "image.state", self.settings.request_timeout_s
        )
        return list(getattr(response, "images", []))

    async def set_firmware_state(self, image_hash: bytes | None, *, confirm: bool) -> None:
        """Mark an image for test (``confirm=False``) or confirm the running one."""
        await self.request_as(
            smpimg.ImageStatesWriteRequest(hash=image_hash, confirm=confirm),
            "image.state",
            self.settings.request_timeout_s,
        )

    # --- model group ------------------------------------------------------------------

    async def identity(self) -> mg.IdentityResponse:
        """Device id, hardware id, firmware version, and the nonce for its check-in."""
        return await self._model(mg.IdentityRequest(), mg.IdentityResponse, "model.identity")

    async def slots(self) -> mg.SlotsResponse:
        """Both model slots, the running one and the stored release counters."""
        return await self._model(mg.SlotsRequest(), mg.SlotsResponse, "model.slots")

    async def upload_model(
        self, bundle: bytes, *, on_progress: ProgressHook | None = None
    ) -> UploadResult:
        """Upload a bundle into the inactive slot, pipelined, resuming at the device's offset.

        Raises:
            DeviceRejected: TOO_LARGE (with the budget in the reason), BUSY, NO_SESSION.
            UploadMismatch: If the device's copy hashes differently.
            Disconnected, LinkTimeout: Call again on a new connection to resume.
        """
        bundle_sha256 = hashlib.sha256(bundle).digest()

        def make(off: int, data: bytes, first: bool) -> message.WriteRequest:
            if first:
                return mg.UploadRequest(off=off, data=data, len=len(bundle), sha=bundle_sha256)
            return mg.UploadRequest(off=off, data=data)

        return await self._upload(bundle, bundle_sha256, make, "model.upload", on_progress)

    async def activate(self, assignment: bytes) -> mg.ActivateResponse:
        """Activate the uploaded bundle under the director's signed assignment envelope.

        Raises:
            DeviceRejected: With the device's verdict (SIGNATURE, WRONG_HARDWARE, ROLLBACK,
                HASH_MISMATCH, DOES_NOT_FIT, ...).
        """
        return await self._model(
            mg.ActivateRequest(assignment=assignment),
            mg.ActivateResponse,
            "model.activate",
            self.settings.activate_timeout_s,
        )

    async def self_test(self) -> mg.SelfTestResponse:
        """Run the self-test vectors; confirms a ``testing`` slot or reverts it.

        Raises:
            DeviceRejected: SELFTEST_FAILED (the device reverted) or NO_MODEL.
        """
        return await self._model(
            mg.SelfTestRequest(),
            mg.SelfTestResponse,
            "model.self-test",
            self.settings.activate_timeout_s,
        )

    async def read_telemetry(self, max_windows: int | None = None) -> TelemetryRead:
        """Seal the device's open windows and read the oldest unacknowledged pieces.

        Raises:
            ProtocolError: If a window does not match the TelemetryWindow schema.
        """
        from firmware_bundles.messages import TelemetryWindow

        response = await self._model(
            mg.TelemetryReadRequest(max=max_windows), mg.TelemetryReadResponse, "model.telemetry"
        )
        windows = []
        for entry in response.windows:
            try:
                windows.append((entry.seq, TelemetryWindow.model_validate(entry.window)))
            except ValidationError as exc:
                raise ProtocolError(
                    f"telemetry window {entry.seq} is malformed: {exc}", self.link.name
                ) from exc
        return TelemetryRead(response.boot_epoch, windows, response.more)

    async def ack_telemetry(self, upto: int) -> int:
        """Let the device forget window pieces up to ``upto``; returns how many remain."""
        response = await self._model(
            mg.TelemetryAckRequest(upto=upto), mg.TelemetryAckResponse, "model.telemetry-ack"
        )
        return response.pending

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> InferResult:
        """Run the active model once on the device.

        Raises:
            DeviceRejected: BAD_INPUT (naming the input) or NO_MODEL.
        """
        import numpy as np

        tensors = {
            name: mg.Tensor(
                dtype=str(array.dtype),
                shape=list(array.shape),
                data=np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes(),
            )
            for name, array in inputs.items()
        }
        response = await self._model(
            mg.InferRequest(inputs=tensors),
            mg.InferResponse,
            "model.infer",
            self.settings.activate_timeout_s,
        )
        outputs = {name: tensor_to_array(t) for name, t in response.outputs.items()}
        return InferResult(outputs, response.latency_us, response.arena_bytes)

    async def _model(
        self,
        request: message.Request,
        response: type[R],
        command: str,
        timeout_s: float | None = None,
    ) -> R:
        timeout = timeout_s or self.settings.request_timeout_s
        answer = await self.request_as(request, command, timeout)
        assert isinstance(answer, response)
        return answer

    async def _upload(
        self,
        data: bytes,
        sha256: bytes,
        make: RequestFactory,
        command: str,
        on_progress: ProgressHook | None,
    ) -> UploadResult:
        """Upload ``data`` pipelined to the device's buffers, at the upload timeout."""
        limit = self.settings.max_in_flight or self.parameters.buf_count
        return await pipelined_upload(
            self,
            data,
            make,
            command=command,
            sha256_hex=sha256.hex(),
            window=max(1, min(limit, self.parameters.buf_count)),
            timeout_s=self.settings.upload_timeout_s,
            on_progress=on_progress,
        )


def _key(header: smpheader.Header) -> tuple[int, int, int]:
    return (int(header.sequence), int(header.group_id), int(header.command_id))


def tensor_to_array(tensor: mg.Tensor) -> np.ndarray:
    """A wire tensor as a numpy array.

    Raises:
        ValueError: If the dtype is unknown or the bytes do not fill the shape.
    """
    import numpy as np

    array = np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype).newbyteorder("<"))
    return array.reshape(tensor.shape).astype(np.dtype(tensor.dtype))


def _raise_if_refused(body: dict[Any, Any], group: int, command: int, link: str) -> None:
    err = body.get("err")
    if isinstance(err, dict) and isinstance(err.get("rc"), int) and err["rc"] != 0:
        rc = int(err["rc"])
        err_group = int(err.get("group", group))
        raise DeviceRejected(
            err_group, command, rc, mg.rc_name(err_group, rc), str(body.get("rsn") or ""), link
        )
    legacy_rc = body.get("rc")
    if isinstance(legacy_rc, int) and legacy_rc != 0:
        raise DeviceRejected(
            group, command, legacy_rc, mg.rc_name(0, legacy_rc), str(body.get("rsn") or ""), link
        )
