"""The emulated ring or board: an SMP server over file-backed flash, independent of transport.

:meth:`EmulatedDevice.handle` takes one request frame and returns the response frame; the pty
server (:mod:`hil.serial_device`) and the Bumble GATT server (:mod:`hil.ble_device`) carry
frames to it. It serves the OS group (echo, reset, MCUmgr parameters), the image group
(:mod:`hil.firmware`) and the model group (``docs/device-protocol.md``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from pydantic import ValidationError
from smp import header as smpheader
from smp import image_management as smpimg
from smp import message
from smp import os_management as smpos
from smp.error import MGMT_ERR
from smp.exceptions import SMPMalformed

from device_agent.link import model_group as mg
from device_agent.link.client import tensor_to_array
from firmware_bundles.root import Root
from hil.device_telemetry import DeviceTelemetry
from hil.errors import PowerCut, Refusal
from hil.firmware import FirmwareSlots
from hil.flash import Flash, FlashLayout
from hil.model_store import SLOT_REGIONS, ModelStore
from hil.profiles import DeviceProfile
from hil.record import RECORD_REGIONS, DeviceRecord, load_record, save_record
from hil.secondary import DeviceFacts, verify_activation

Clock = Callable[[], datetime]

#: Room kept in a telemetry answer for the SMP header and the map around the windows.
_TELEMETRY_OVERHEAD_BYTES = 64


def flash_layout(profile: DeviceProfile) -> FlashLayout:
    """The flash regions of a device profile."""
    sizes = dict.fromkeys(RECORD_REGIONS, 4096)
    sizes.update(dict.fromkeys(SLOT_REGIONS, profile.target.max_bundle_bytes))
    sizes.update({"image-0": profile.firmware_slot_bytes, "image-1": profile.firmware_slot_bytes})
    return FlashLayout(sizes)


class EmulatedDevice:
    """One emulated device. Building it is booting it from its flash file.

    Args:
        profile: What device it is.
        flash_path: Its flash file (kept across restarts).
        root: The trusted root provisioned at the factory.
        device_id: Its device id.
        clock: Its real-time clock.
    """

    def __init__(
        self,
        profile: DeviceProfile,
        flash_path: Path,
        root: Root,
        *,
        device_id: str,
        clock: Clock | None = None,
    ) -> None:
        self.profile = profile
        self.flash_path = flash_path
        self.root = root
        self.device_id = device_id
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.reboot_requested = False
        self.boots = 0
        self.boot()

    def boot(self) -> None:
        """(Re)start from flash: RAM state (nonce, upload session, telemetry) starts empty."""
        previous: Flash | None = getattr(self, "flash", None)
        if previous is not None:
            previous.close()
        self.flash = Flash(self.flash_path, flash_layout(self.profile))
        self.record = load_record(self.flash) or DeviceRecord()
        self.record.boot_epoch += 1
        save_record(self.flash, self.record)
        self.firmware = FirmwareSlots(self.flash, self.record, self.profile.firmware_slot_bytes)
        self.firmware.boot(self.profile.firmware_version)
        target = self.profile.target
        self.store = ModelStore(
            self.flash, self.record, target.max_bundle_bytes, target.ram_arena_bytes
        )
        self.store.boot()
        self.telemetry = DeviceTelemetry(
            self.device_id, self.profile.telemetry_window_s, self.clock
        )
        self.nonce: str | None = None
        self._nonce_used_by: bytes | None = None
        self.reboot_requested = False
        self.boots += 1

    @property
    def alive(self) -> bool:
        """False after an injected power cut, until :meth:`boot`."""
        return not self.flash.dead

    def cut_power_at(self, operation: int | None) -> None:
        """Arm a power cut at the ``operation``-th flash write or erase from now."""
        self.flash.arm_power_cut(operation)

    def handle(self, frame: bytes) -> bytes | None:
        """Serve one request frame; None when the device is dead (power cut) and says nothing."""
        if not self.alive or len(frame) < smpheader.Header.SIZE:
            return None
        header = smpheader.Header.loads(frame[: smpheader.Header.SIZE])
        try:
            return self._dispatch(header, frame)
        except PowerCut:
            return None
        except Refusal as refusal:
            return mg.encode_error(header, refusal.rc, refusal.reason)
        except (ValidationError, SMPMalformed, cbor2.CBORDecodeError, ValueError) as exc:
            if int(header.group_id) == mg.MODEL_GROUP_ID:
                return mg.encode_error(header, mg.ModelRc.BAD_REQUEST, _short(exc))
            return mg.encode_error(header, MGMT_ERR.EINVAL, _short(exc))

    def _dispatch(self, header: smpheader.Header, frame: bytes) -> bytes:
        group, command = int(header.group_id), int(header.command_id)
        if not isinstance(cbor2.loads(frame[smpheader.Header.SIZE :]), dict):
            raise ValueError("body is not a CBOR map")
        write = header.op == smpheader.OP.WRITE
        if group == smpheader.GroupId.OS_MANAGEMENT:
            return self._os(header, frame, command)
        if group == smpheader.GroupId.IMAGE_MANAGEMENT:
            return self._image(header, frame, command, write)
        if group == mg.MODEL_GROUP_ID and command in mg.REQUESTS:
            request_cls = mg.REQUESTS[command]
            if (request_cls._OP == smpheader.OP.WRITE) == write:
                request = request_cls.loads(frame)
                fields = self._model(request)
                return _reply(mg.RESPONSES[request_cls], header, fields)
        return mg.encode_unsupported(header)

    def _os(self, header: smpheader.Header, frame: bytes, command: int) -> bytes:
        if command == smpheader.CommandId.OSManagement.ECHO:
            echo = smpos.EchoWriteRequest.loads(frame)
            return _reply(smpos.EchoWriteResponse, header, {"r": echo.d})
        if command == smpheader.CommandId.OSManagement.MCUMGR_PARAMETERS:
            return _reply(
                smpos.MCUMgrParametersReadResponse,
                header,
                {"buf_size": self.profile.buf_size, "buf_count": self.profile.buf_count},
            )
        if command == smpheader.CommandId.OSManagement.RESET:
            # The transport restarts the device once this answer is on its way.
            self.reboot_requested = True
            return _reply(smpos.ResetWriteResponse, header, {})
        return mg.encode_unsupported(header)

    def _image(self, header: smpheader.Header, frame: bytes, command: int, write: bool) -> bytes:
        if command == smpheader.CommandId.ImageManagement.UPLOAD and write:
            fields = self.firmware.upload(smpimg.ImageUploadWriteRequest.loads(frame))
            return _reply(smpimg.ImageUploadWriteResponse, header, fields)
        if command == smpheader.CommandId.ImageManagement.STATE:
            if write:
                self.firmware.set_state(smpimg.ImageStatesWriteRequest.loads(frame))
                response: type[message.Response] = smpimg.ImageStatesWriteResponse
            else:
                response = smpimg.ImageStatesReadResponse
            return _reply(response, header, {"images": self.firmware.states()})
        return mg.encode_unsupported(header)

    def _model(self, request: message.Request) -> dict[str, Any]:
        if isinstance(request, mg.IdentityRequest):
            return self._identity()
        if isinstance(request, mg.SlotsRequest):
            return self.store.report()
        if isinstance(request, mg.UploadRequest):
            return self.store.upload(request.off, request.data, request.len, request.sha)
        if isinstance(request, mg.ActivateRequest):
            return self._activate(request.assignment)
        if isinstance(request, mg.SelfTestRequest):
            return self._self_test()
        if isinstance(request, mg.TelemetryReadRequest):
            return self._read_telemetry(request.max)
        if isinstance(request, mg.TelemetryAckRequest):
            return {"pending": self.telemetry.acknowledge(request.upto)}
        if isinstance(request, mg.InferRequest):
            return self._infer(request)
        raise Refusal(mg.ModelRc.UNKNOWN, f"no handler for {type(request).__name__}")

    def _identity(self) -> dict[str, Any]:
        if self.nonce is None or self._nonce_used_by is not None:
            self.nonce, self._nonce_used_by = secrets.token_hex(16), None
        target = self.profile.target
        return {
            "device_id": self.device_id,
            "hardware_id": target.hardware_id,
            "firmware_version": self.firmware.version,
            "nonce": self.nonce,
            "boot_epoch": self.record.boot_epoch,
            "protocol": mg.PROTOCOL_VERSION,
            "max_bundle_bytes": target.max_bundle_bytes,
            "ram_arena_bytes": target.ram_arena_bytes,
        }

    def _activate(self, envelope: bytes) -> dict[str, Any]:
        staged = self.store.staged()
        facts = DeviceFacts(
            device_id=self.device_id,
            target=self.profile.target,
            firmware_version=self.firmware.version,
            nonce=self.nonce,
            counters=self.record.release_counters(),
        )
        digest = hashlib.sha256(envelope).digest()
        if self._nonce_used_by not in (None, digest):
            raise Refusal(
                mg.ModelRc.NONCE, "the nonce was used by another assignment set; read identity"
            )
        verified = verify_activation(envelope, staged, self.root, facts, self.clock())
        answer = self.store.activate(verified)
        # The set may assign several models under this one nonce; it stays good for this set
        # only, and the next identity read issues a fresh one.
        self._nonce_used_by = digest
        return answer

    def _self_test(self) -> dict[str, Any]:
        running = self.store.running
        if running is None:
            raise Refusal(mg.ModelRc.NO_MODEL, "no active model")
        outcome = running.runtime.self_test()
        if not outcome.passed:
            self.telemetry.record_error(running.manifest, running.bundle_sha256, self_test=True)
            detail = outcome.detail
            if not self.record.confirmed:
                detail = self.store.revert(detail)
            raise Refusal(mg.ModelRc.SELFTEST_FAILED, detail)
        if not self.record.confirmed:
            self.store.confirm()
        return {
            "slot": running.slot,
            "passed": True,
            "vectors": outcome.vectors,
            "worst_error": outcome.worst_error,
            "state": "active",
        }

    def _read_telemetry(self, max_windows: int | None) -> dict[str, Any]:
        self.telemetry.seal()
        budget = self.profile.buf_size - _TELEMETRY_OVERHEAD_BYTES
        pieces, more = self.telemetry.read(max_windows, budget)
        return {
            "boot_epoch": self.record.boot_epoch,
            "windows": [{"seq": p.seq, "window": p.window} for p in pieces],
            "more": more,
        }

    def _infer(self, request: mg.InferRequest) -> dict[str, Any]:
        running = self.store.running
        if running is None:
            raise Refusal(mg.ModelRc.NO_MODEL, "no active model")
        try:
            inputs = {name: tensor_to_array(t) for name, t in request.inputs.items()}
        except (ValueError, TypeError) as exc:
            raise Refusal(mg.ModelRc.BAD_INPUT, f"tensor does not decode: {exc}") from exc
        try:
            outputs, latency = running.runtime.run(inputs)
        except Refusal:
            self.telemetry.record_error(running.manifest, running.bundle_sha256, self_test=False)
            raise
        self.telemetry.record(running.manifest, running.bundle_sha256, inputs, outputs, latency)
        return {
            "outputs": {name: _tensor(array) for name, array in outputs.items()},
            "latency_us": max(1, round(latency * 1e6)),
            "arena_bytes": running.runtime.arena_bytes,
        }


def _tensor(array: np.ndarray) -> dict[str, Any]:
    little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": little.tobytes()}


def _reply(cls: type[message.Response], header: smpheader.Header, fields: dict[str, Any]) -> bytes:
    return cls(sequence=header.sequence, version=header.version, **fields).BYTES


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return f"{where}: {first['msg']}"[:200]
    text = str(exc).splitlines()
    return text[0][:200] if text else type(exc).__name__
