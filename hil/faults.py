"""Link faults for the rig and the tests: a disconnect at an upload offset, a flipped bit.

:class:`FaultyLink` wraps any :class:`~device_agent.link.DeviceLink` and acts on the model
group's uploads: it drops the connection once the device has acknowledged a chosen offset (the
device keeps what it has; the client must resume there), or flips
one bit of the bundle in one request's data (as a bad phone buffer would, after the link's own
CRC), which the device's SHA-256 check must catch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import cbor2
from smp import header as smpheader

from device_agent.link.errors import Disconnected
from device_agent.link.model_group import MODEL_GROUP_ID, ModelCommand
from device_agent.link.transport import DeviceLink

FAULT_KINDS = ("disconnect", "bitflip", "power-cut")


@dataclass
class FaultLog:
    """What the wrapper did."""

    cut_at: int | None = None
    flipped_at: int | None = None


@dataclass(eq=False)
class FaultyLink:
    """A :class:`DeviceLink` that injects faults into model uploads.

    Attributes:
        inner: The real link.
        cut_at_offset: Drop the connection (once) when the device acknowledges an upload offset
            at or past this one; the acknowledgement is lost with the connection.
        on_cut: How to drop it (a radio drop, a cable pull); awaited before the error.
        flip_bit_at: Flip the lowest bit of this bundle byte in the request that carries it.
        log: What it did.
    """

    inner: DeviceLink
    _: KW_ONLY
    cut_at_offset: int | None = None
    on_cut: Callable[[], Awaitable[None]] | None = None
    flip_bit_at: int | None = None
    log: FaultLog = field(default_factory=FaultLog, init=False)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def max_frame_bytes(self) -> int:
        return self.inner.max_frame_bytes

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def receive(self) -> bytes:
        frame = await self.inner.receive()
        cut = self.cut_at_offset
        if cut is not None and self.log.cut_at is None:
            answer = _upload_body(frame, need_data=False)
            if answer is not None and int(answer["off"]) >= cut:
                # The device has this much; the answer and everything in flight are lost.
                self.log.cut_at = int(answer["off"])
                if self.on_cut is not None:
                    await self.on_cut()
                raise Disconnected(
                    f"injected disconnect at upload offset {self.log.cut_at}", self.name
                )
        return frame

    def set_buffer_size(self, buf_size: int) -> None:
        self.inner.set_buffer_size(buf_size)

    async def send(self, frame: bytes) -> None:
        upload = _upload_body(frame, need_data=True)
        if upload is not None:
            off, data = int(upload["off"]), bytes(upload["data"])
            target = self.flip_bit_at
            if (
                target is not None
                and self.log.flipped_at is None
                and off <= target < off + len(data)
            ):
                flipped = bytearray(data)
                flipped[target - off] ^= 0x01
                upload["data"] = bytes(flipped)
                frame = frame[: smpheader.Header.SIZE] + cbor2.dumps(upload, canonical=True)
                self.log.flipped_at = target
        await self.inner.send(frame)


def _upload_body(frame: bytes, *, need_data: bool) -> dict[str, Any] | None:
    """The CBOR body of a model-upload request (``need_data``) or answer, else None."""
    if len(frame) < smpheader.Header.SIZE:
        return None
    header = smpheader.Header.loads(frame[: smpheader.Header.SIZE])
    if (int(header.group_id), int(header.command_id)) != (MODEL_GROUP_ID, ModelCommand.UPLOAD):
        return None
    body = cbor2.loads(frame[smpheader.Header.SIZE :])
    if not isinstance(body, dict) or "off" not in body or (need_data and "data" not in body):
        return None
    return body
