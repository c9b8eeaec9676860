"""Devices under test, emulated or real, behind one interface the rig and the tests drive.

A spec names one: ``emulated:ring-gen3`` (a Bumble GATT server on a radio-paced link),
``emulated:devboard-nrf52840`` (an SMP server on a pty at UART speed), ``serial:/dev/ttyACM0``
or ``ble:AA:BB:CC:DD:EE:FF`` (real hardware, opt-in). Only emulated devices can have their power
cut or their flash inspected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from device_agent.link.client import DeviceClient
from device_agent.link.config import LinkSettings
from device_agent.link.transport import DeviceLink, serial_link
from firmware_bundles.root import Root
from hil.device import EmulatedDevice
from hil.errors import DeviceSpecError, RigError
from hil.profiles import profile_for
from hil.serial_device import PtyDevboard, UartTiming

T = TypeVar("T")


class DeviceUnderTest:
    """One device the rig talks to.

    Attributes:
        spec: The spec it was made from.
        client: The client of the current connection, if connected.
    """

    def __init__(self, spec: str, settings: LinkSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.client: DeviceClient | None = None
        self.wrap: Callable[[DeviceLink], DeviceLink] | None = None

    @property
    def emulated(self) -> EmulatedDevice | None:
        """The emulated device core, or None for real hardware."""
        return None

    @property
    def ceiling_bytes_per_s(self) -> float | None:
        """The link's payload ceiling for uploads, when it is known."""
        return None

    async def start(self) -> None:
        """Power on (emulated) or check the device is there (real)."""

    async def connect(self) -> DeviceClient:
        """A connected client on a fresh link (through :attr:`wrap`, if set)."""
        link = await self._link()
        if self.wrap is not None:
            link = self.wrap(link)
        client = DeviceClient(link, self.settings)
        await client.connect()
        self.client = client
        return client

    async def _link(self) -> DeviceLink:
        raise NotImplementedError

    async def disconnect(self) -> None:
        """Close the current connection politely."""
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()

    async def drop(self) -> None:
        """Lose the connection abruptly (cable pulled, ring out of range)."""
        await self.disconnect()

    async def restart(self) -> None:
        """Power back on after a power cut.

        Raises:
            RigError: For real hardware (it needs a power switch the rig does not have).
        """
        raise RigError(f"{self.spec}: cannot cut and restore power on real hardware")

    def call(self, fn: Callable[[EmulatedDevice], T]) -> T:
        """Run ``fn`` on the emulated device core, safely between requests.

        Raises:
            RigError: For real hardware.
        """
        raise RigError(f"{self.spec}: not an emulated device")

    async def stop(self) -> None:
        """Disconnect and power off."""
        await self.disconnect()


class EmulatedSerialBoard(DeviceUnderTest):
    """An emulated board served on a pty at ``uart`` speed."""

    def __init__(
        self, spec: str, device: EmulatedDevice, settings: LinkSettings, uart: UartTiming
    ) -> None:
        super().__init__(spec, settings)
        self.board = PtyDevboard(device, uart)

    @property
    def emulated(self) -> EmulatedDevice:
        return self.board.device

    @property
    def ceiling_bytes_per_s(self) -> float:
        message = self.board.device.profile.buf_size - 4
        return self.board.uart.framed_ceiling_bytes_per_s(message)

    async def start(self) -> None:
        self.board.start()

    async def _link(self) -> DeviceLink:
        return serial_link(
            self.board.port,
            baudrate=self.board.uart.baud,
            connect_timeout_s=self.settings.connect_timeout_s,
        )

    async def drop(self) -> None:
        self.board.cut_wire()
        await self.disconnect()

    async def restart(self) -> None:
        self.board.restart()

    def call(self, fn: Callable[[EmulatedDevice], T]) -> T:
        return self.board.call(lambda: fn(self.board.device))

    async def stop(self) -> None:
        await self.disconnect()
        self.board.stop()


class EmulatedBleRing(DeviceUnderTest):
    """An emulated ring on a Bumble link paced by a radio timing model."""

    def __init__(
        self, spec: str, device: EmulatedDevice, settings: LinkSettings, timing: Any = None
    ) -> None:
        super().__init__(spec, settings)
        from hil.ble_device import BleRing

        self.ring = BleRing(device, timing)

    @property
    def emulated(self) -> EmulatedDevice:
        return self.ring.device

    @property
    def ceiling_bytes_per_s(self) -> float:
        return self.ring.timing.ceiling_bytes_per_s(self.ring.att_mtu)

    async def start(self) -> None:
        await self.ring.start()

    async def _link(self) -> DeviceLink:
        from device_agent.link.ble import BumbleConnectionLink

        connection = await self.ring.connect(self.settings.connect_timeout_s)
        return BumbleConnectionLink(
            connection,
            preferred_mtu=self.settings.ble_preferred_mtu,
            connect_timeout_s=self.settings.connect_timeout_s,
        )

    async def disconnect(self) -> None:
        await super().disconnect()
        await self.ring.drop()

    async def drop(self) -> None:
        self.client = None
        await self.ring.drop()

    async def restart(self) -> None:
        self.client = None
        await self.ring.restart()

    def call(self, fn: Callable[[EmulatedDevice], T]) -> T:
        return fn(self.ring.device)

    async def stop(self) -> None:
        self.client = None
        await self.ring.stop()


class SerialDevice(DeviceUnderTest):
    """Real hardware on a serial port."""

    def __init__(self, spec: str, port: str, settings: LinkSettings) -> None:
        super().__init__(spec, settings)
        self.port = port

    async def _link(self) -> DeviceLink:
        return serial_link(
            self.port,
            baudrate=self.settings.serial_baudrate,
            connect_timeout_s=self.settings.connect_timeout_s,
        )


class BleDevice(DeviceUnderTest):
    """Real hardware over BLE through bleak (needs BlueZ on Linux)."""

    def __init__(self, spec: str, address: str, settings: LinkSettings) -> None:
        super().__init__(spec, settings)
        self.address = address

    async def _link(self) -> DeviceLink:
        from device_agent.link.ble import bleak_link

        return bleak_link(self.address, connect_timeout_s=self.settings.connect_timeout_s)


def open_device(
    spec: str,
    *,
    work_dir: Path,
    root: Root,
    settings: LinkSettings,
    index: int = 0,
    uart: UartTiming | None = None,
    radio: Any = None,
) -> DeviceUnderTest:
    """The device a spec names; emulated ones get a flash file under ``work_dir``.

    Raises:
        DeviceSpecError: If the spec is malformed or names a target that cannot be emulated.
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise DeviceSpecError(
            f"device spec {spec!r} needs a kind and a value: emulated:TARGET, serial:PORT"
            " or ble:ADDRESS"
        )
    if kind == "serial":
        return SerialDevice(spec, rest, settings)
    if kind == "ble":
        return BleDevice(spec, rest, settings)
    if kind != "emulated":
        raise DeviceSpecError(
            f"device spec {spec!r}: unknown kind {kind!r} (emulated, serial, ble)"
        )
    profile = profile_for(rest)
    device_id = f"emu-{rest}-{index}"
    device = EmulatedDevice(profile, work_dir / f"{device_id}.flash", root, device_id=device_id)
    if profile.link == "serial":
        return EmulatedSerialBoard(spec, device, settings, uart or UartTiming())
    return EmulatedBleRing(spec, device, settings, radio)
