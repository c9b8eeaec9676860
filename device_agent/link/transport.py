"""The one async :class:`DeviceLink` protocol, and its implementation on smpclient transports.

A link moves whole SMP frames (header + CBOR) to a device and back; it knows nothing of groups or
commands. :class:`SMPTransportLink` adapts any smpclient ``SMPTransport`` (serial through
pyserial, BLE through bleak or Bumble) and maps their errors to ours where they enter.
Clients receive a link and never build one; :func:`serial_link` builds the serial one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from device_agent.link.errors import Disconnected, LinkError

if TYPE_CHECKING:
    from smpclient.transport import SMPTransport


@runtime_checkable
class DeviceLink(Protocol):
    """A bidirectional pipe of SMP frames to one device."""

    @property
    def name(self) -> str:
        """Where the link goes (``serial:/dev/ttyACM0``, ``ble:F0:F1:...``)."""
        ...

    @property
    def max_frame_bytes(self) -> int:
        """The largest request frame (SMP header + CBOR) the device accepts on this link."""
        ...

    async def open(self) -> None:
        """Connect to the device.

        Raises:
            Disconnected: If the device cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Disconnect; closing a closed link does nothing."""
        ...

    async def send(self, frame: bytes) -> None:
        """Send one request frame.

        Raises:
            Disconnected: If the link dropped.
        """
        ...

    async def receive(self) -> bytes:
        """The next response frame from the device, waiting as long as it takes.

        Raises:
            Disconnected: If the link dropped.
        """
        ...

    def set_buffer_size(self, buf_size: int) -> None:
        """Tell the link the device's ``buf_size`` (MCUmgr parameters), sizing frames."""
        ...


class LinkState:
    """What every link implementation shares: its name, and no frames while it is closed."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._open = False

    @property
    def name(self) -> str:
        return self._name

    def _require_open(self) -> None:
        """Raises: Disconnected if the link is not open."""
        if not self._open:
            raise Disconnected("link is not open", self._name)


class SMPTransportLink(LinkState):
    """A :class:`DeviceLink` over an smpclient transport (serial, bleak BLE, Bumble BLE).

    Args:
        transport: The smpclient transport, not yet connected.
        address: What ``transport.connect`` takes (a port path, a BLE address or name).
        name: The link's name in errors and reports.
        connect_timeout_s: How long ``open`` may take.
    """

    def __init__(
        self,
        transport: SMPTransport,
        address: str,
        name: str,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(name)
        self._transport = transport
        self._address = address
        self._connect_timeout_s = connect_timeout_s

    @property
    def max_frame_bytes(self) -> int:
        return int(self._transport.max_unencoded_size)

    @property
    def transport(self) -> SMPTransport:
        """The wrapped smpclient transport (for smpclient's own ``SMPClient``)."""
        return self._transport

    async def open(self) -> None:
        with self._mapped("open"):
            await self._connect()
        self._open = True

    async def _connect(self) -> None:
        await self._transport.connect(self._address, self._connect_timeout_s)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        with self._mapped("close"):
            await self._transport.disconnect()

    async def send(self, frame: bytes) -> None:
        self._require_open()
        with self._mapped("send"):
            await self._transport.send(frame)

    async def receive(self) -> bytes:
        self._require_open()
        with self._mapped("receive"):
            return await self._transport.receive()

    def set_buffer_size(self, buf_size: int) -> None:
        with self._mapped("initialise"):
            self._transport.initialize(buf_size)

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        """Map pyserial, bleak, Bumble and smpclient errors to ours, keeping the cause."""
        try:
            yield
        except LinkError:
            raise
        except ValueError as exc:
            if action == "send":
                # smpclient refuses a frame over the device's buffer: a client bug, not the link.
                raise LinkError(f"frame refused by the transport: {exc}", self._name) from exc
            raise
        except (OSError, EOFError, TimeoutError) as exc:
            self._open = False
            raise Disconnected(f"{action} failed: {exc}", self._name) from exc
        except Exception as exc:
            if not _is_foreign(exc):
                raise
            self._open = False
            raise Disconnected(f"{action} failed: {type(exc).__name__}: {exc}", self._name) from exc


def _is_foreign(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _FOREIGN_MODULES


#: Packages whose errors mean "the link failed" when they surface from a transport.
_FOREIGN_MODULES = frozenset({"serial", "bleak", "bumble", "smpclient", "smp", "dbus_fast"})


def serial_link(
    port: str, *, baudrate: int = 115200, connect_timeout_s: float = 10.0
) -> SMPTransportLink:
    """A link over a serial port (UART, USB CDC ACM) with SMP console framing.

    Raises:
        ImportError: If pyserial is missing (the ``device`` extra).
    """
    from smpclient.transport.serial import Auto, SMPSerialTransport

    transport = SMPSerialTransport(Auto(), baudrate=baudrate)
    return SMPTransportLink(transport, port, f"serial:{port}", connect_timeout_s)
