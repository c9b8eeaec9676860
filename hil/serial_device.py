"""An emulated dev board on a real pty: SMP console framing at the speed of a UART.

The device thread owns the master end of an ``os.openpty()`` pair; clients open the slave by
its path with pyserial (smpclient's ``SMPSerialTransport``), as they would ``/dev/ttyACM0``.
The UART is modelled in real time: a byte takes ``10 / baud`` seconds (8N1) each way, a frame
is served when its last line has arrived, and response lines appear when their last byte has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import tty
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from smp import packet as smppacket
from smp.exceptions import SMPBadContinueDelimiter, SMPBadCRC, SMPBadStartDelimiter

from hil.device import EmulatedDevice

T = TypeVar("T")

#: Base64 console lines as smpclient writes them (start or continue delimiter, text, newline).
LINE_LENGTH = 128


@dataclass(frozen=True)
class UartTiming:
    """A UART at ``baud`` with 8N1 framing: ten bit times per byte."""

    baud: int = 115200
    bits_per_byte: int = 10

    @property
    def bytes_per_s(self) -> float:
        return self.baud / self.bits_per_byte

    def wire_bytes(self, message_bytes: int, line_length: int = LINE_LENGTH) -> int:
        """Bytes on the wire for one SMP message in console framing."""
        return sum(len(p) for p in smppacket.encode(bytes(message_bytes), line_length))

    def framed_ceiling_bytes_per_s(self, message_bytes: int) -> float:
        """SMP message bytes per second with the line busy sending ``message_bytes`` messages."""
        return self.bytes_per_s * message_bytes / self.wire_bytes(message_bytes)


@dataclass
class SerialStats:
    """What crossed the pty (for tests and the bench)."""

    frames_in: int = 0
    frames_out: int = 0
    bad_frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class PtyDevboard:
    """Serves an :class:`EmulatedDevice` on a pty at UART speed, in its own thread.

    Args:
        device: The device core (the thread calls it; use :meth:`call` from outside).
        uart: The UART's timing.
    """

    def __init__(self, device: EmulatedDevice, uart: UartTiming | None = None) -> None:
        self.device = device
        self.uart = uart or UartTiming()
        self.stats = SerialStats()
        self._master = -1
        self._slave = -1
        self.port = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._line = bytearray()
        self._decoder: object | None = None
        self._rx_free = 0.0
        self._tx_free = 0.0
        self._on_wire: list[asyncio.TimerHandle] = []

    def start(self) -> str:
        """Open the pty and start serving; returns the port path for clients."""
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name=f"pty-{self.port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        return self.port

    def stop(self) -> None:
        """Stop serving and close the pty."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        self.device.flash.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the device thread (between frames) and return its result."""
        if self._loop is None:
            return fn()
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result()

    def restart(self) -> None:
        """Power the board back on: the device boots again from its flash file."""
        self.call(self.device.boot)

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.add_reader(self._master, self._on_readable)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._master)
            loop.close()

    def _on_readable(self) -> None:
        assert self._loop is not None
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # no client has the slave open: nothing to hear
        self.stats.bytes_in += len(data)
        byte_s = 1.0 / self.uart.bytes_per_s
        self._rx_free = max(self._rx_free, self._loop.time())
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            piece = data[start:end]
            self._rx_free += len(piece) * byte_s
            self._on_wire.append(self._loop.call_at(self._rx_free, self._on_piece, piece))
            start = end

    def cut_wire(self) -> None:
        """Pull the cable: bytes still on their way, either direction, are lost."""
        self.call(self._cut_wire)

    def _cut_wire(self) -> None:
        assert self._loop is not None
        # Bytes the client wrote that the device has not read yet were on the wire too.
        with contextlib.suppress(OSError):
            while os.read(self._master, 4096):
                pass
        for handle in self._on_wire:
            handle.cancel()
        self._on_wire.clear()
        self._line, self._decoder = bytearray(), None
        self._rx_free = self._tx_free = self._loop.time()

    def _on_piece(self, piece: bytes) -> None:
        self._prune()
        self._line += piece
        if self._line.endswith(b"\n"):
            line, self._line = bytes(self._line), bytearray()
            self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        if line.startswith(smppacket.START_DELIMITER):
            self._decoder = smppacket.decode()
            next(self._decoder)
        elif not line.startswith(smppacket.CONTINUE_DELIMITER) or self._decoder is None:
            return  # console text between frames, or a continuation without a start
        try:
            self._decoder.send(line)  # type: ignore[attr-defined]
        except StopIteration as done:
            self._decoder = None
            self._on_frame(bytes(done.value))
        except (SMPBadCRC, SMPBadStartDelimiter, SMPBadContinueDelimiter, ValueError):
            # A corrupted frame is dropped, as Zephyr's console transport does; the client
            # times out and retries.
            self._decoder = None
            self.stats.bad_frames += 1

    def _on_frame(self, frame: bytes) -> None:
        self.stats.frames_in += 1
        response = self.device.handle(frame)
        if response is not None:
            self.stats.frames_out += 1
            for line in smppacket.encode(response, LINE_LENGTH):
                self._transmit(line)
        if self.device.reboot_requested:
            assert self._loop is not None
            self._loop.call_at(self._tx_free, self.device.boot)

    def _transmit(self, line: bytes) -> None:
        assert self._loop is not None
        self._tx_free = max(self._tx_free, self._loop.time())
        self._tx_free += len(line) / self.uart.bytes_per_s
        self._on_wire.append(self._loop.call_at(self._tx_free, self._write, line))

    def _prune(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        while self._on_wire and (self._on_wire[0].cancelled() or self._on_wire[0].when() <= now):
            self._on_wire.pop(0)

    def _write(self, line: bytes) -> None:
        # A client whose input buffer is full or gone loses the bytes, as on a real UART.
        with contextlib.suppress(OSError):
            self.stats.bytes_out += os.write(self._master, line)
