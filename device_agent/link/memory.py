"""A simulator link: frames go straight to an in-process SMP handler, with no transport.

For focused tests of clients and emulated devices (``hil``) where serial or radio timing is
not the point; the serial and BLE tests use a real pty and a Bumble link instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from device_agent.link.transport import LinkState

#: Takes one request frame, returns the response frame (None: the device stays silent).
FrameHandler = Callable[[bytes], bytes | None]


class MemoryLink(LinkState):
    """A :class:`~device_agent.link.transport.DeviceLink` to an in-process frame handler.

    Args:
        handler: The device's SMP dispatcher.
        name: The link's name.
    """

    def __init__(self, handler: FrameHandler, name: str = "memory") -> None:
        super().__init__(name)
        self._handler = handler
        self._frames: asyncio.Queue[bytes] = asyncio.Queue()
        self._buf_size = 0

    @property
    def max_frame_bytes(self) -> int:
        return self._buf_size or 256

    async def open(self) -> None:
        self._frames = asyncio.Queue()
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def send(self, frame: bytes) -> None:
        self._require_open()
        response = self._handler(frame)
        if response is not None:
            self._frames.put_nowait(response)

    async def receive(self) -> bytes:
        self._require_open()
        return await self._frames.get()

    def set_buffer_size(self, buf_size: int) -> None:
        self._buf_size = buf_size
