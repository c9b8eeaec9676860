"""An emulated ring: a Bumble GATT server with the SMP service, on a radio-paced ``LocalLink``.

The ring (peripheral) and the phone's controller (central) share one
:class:`~hil.radio.PacedLocalLink`; :meth:`BleRing.connect` returns the central's connection,
which smpclient's Bumble transport adopts (:class:`~device_agent.link.ble.BumbleConnectionLink`).
Requests arrive as writes without response and are reassembled by the SMP header's length;
responses go out as notifications of ATT MTU - 3 bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

try:
    from bumble.controller import Controller
    from bumble.device import Connection, Device
    from bumble.gatt import Characteristic, CharacteristicValue, Service
    from bumble.hci import Address
    from bumble.host import Host
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the emulated BLE ring needs the 'ble' extra: pip install 'edgefleet[ble]'"
    ) from exc
from smp import header as smpheader
from smpclient.transport import SMP_CHARACTERISTIC_UUID, SMP_SERVICE_UUID

from device_agent.link.errors import Disconnected
from hil.device import EmulatedDevice
from hil.radio import PacedLocalLink, RadioTiming

RING_ADDRESS = "F0:E1:D2:C3:B4:A5"
PHONE_ADDRESS = "C0:11:22:33:44:55"
#: How long a disconnect may take before the connection counts as gone.
_DISCONNECT_TIMEOUT_S = 2.0
#: Fast advertising while waiting for the phone (the controller's timer is in milliseconds).
ADVERTISING_INTERVAL_MS = 20.0


class BleRing:
    """An :class:`EmulatedDevice` served over BLE, with the phone's side on the same link.

    Args:
        device: The device core.
        timing: The radio's timing model.
        att_mtu: The largest ATT MTU the ring accepts.
    """

    def __init__(
        self, device: EmulatedDevice, timing: RadioTiming | None = None, *, att_mtu: int = 247
    ) -> None:
        self.device = device
        self.link = PacedLocalLink(timing)
        self.att_mtu = att_mtu
        self.connection: Connection | None = None
        self._peripheral: Device | None = None
        self._central: Device | None = None
        self._characteristic: Characteristic[bytes] | None = None
        self._buffers: dict[int, bytearray] = {}
        self._outbox: asyncio.Queue[tuple[Connection, bytes]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._power_loss: asyncio.Task[None] | None = None

    @property
    def timing(self) -> RadioTiming:
        return self.link.timing

    async def start(self) -> None:
        """Power both radios on and start advertising the ring."""
        # Bumble's controller warns of every packet its host sends on a connection that is gone;
        # the rig drops connections on purpose, so those warnings are noise here.
        logging.getLogger("bumble.controller").setLevel(logging.ERROR)
        self._peripheral = self._device("ring", RING_ADDRESS)
        self._central = self._device("phone", PHONE_ADDRESS)
        self._characteristic = Characteristic(
            str(SMP_CHARACTERISTIC_UUID),
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
            Characteristic.WRITEABLE,
            CharacteristicValue(write=self._on_write),
        )
        self._peripheral.add_service(Service(str(SMP_SERVICE_UUID), [self._characteristic]))
        self._peripheral.gatt_server.max_mtu = self.att_mtu
        await self._peripheral.power_on()
        await self._central.power_on()
        self._sender = asyncio.get_running_loop().create_task(self._send_notifications())
        await self._advertise()

    def _device(self, name: str, address: str) -> Device:
        host = Host()
        host.controller = Controller(name, link=self.link)
        return Device(name=name, address=Address(address), host=host)

    async def _advertise(self) -> None:
        assert self._peripheral is not None
        if self._power_loss is not None:
            # Let the radio finish going down before it comes back up.
            await self._power_loss
            self._power_loss = None
        if not self.device.alive:
            return
        if self._peripheral.is_advertising:
            return
        await self._peripheral.start_advertising(
            auto_restart=False,
            advertising_interval_min=ADVERTISING_INTERVAL_MS,
            advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )

    async def connect(self, timeout_s: float = 10.0) -> Connection:
        """Connect the phone to the ring; returns the phone's side of the connection.

        Raises:
            Disconnected: If the ring does not answer within ``timeout_s`` (not advertising,
                powered off).
        """
        if self._central is None or not self.device.alive:
            raise Disconnected("the ring's radio is off", f"ble:{RING_ADDRESS}")
        try:
            async with asyncio.timeout(timeout_s):
                self.connection = await self._central.connect(Address(RING_ADDRESS))
        except TimeoutError as exc:
            raise Disconnected(
                f"the ring did not answer within {timeout_s:g} s", f"ble:{RING_ADDRESS}"
            ) from exc
        return self.connection

    async def drop(self) -> None:
        """Lose the radio connection (out of range): in-flight packets are lost."""
        connection, self.connection = self.connection, None
        self.link.drop_pending()
        if connection is not None:
            await _disconnect(connection)
        self._buffers.clear()
        await asyncio.sleep(0)
        await self._advertise()

    async def restart(self) -> None:
        """Power the ring back on after a power cut or reset: boot from flash, advertise."""
        self.device.boot()
        await self._advertise()

    async def stop(self) -> None:
        """Disconnect and power both radios off."""
        if self.connection is not None:
            await _disconnect(self.connection)
            self.connection = None
        if self._sender is not None:
            self._sender.cancel()
        for device in (self._peripheral, self._central):
            if device is not None:
                await device.power_off()
        self.device.flash.close()

    def _on_write(self, connection: Any, value: bytes) -> None:
        buffer = self._buffers.setdefault(connection.handle, bytearray())
        buffer.extend(value)
        while len(buffer) >= smpheader.Header.SIZE:
            header = smpheader.Header.loads(bytes(buffer[: smpheader.Header.SIZE]))
            size = smpheader.Header.SIZE + header.length
            if len(buffer) < size:
                return
            frame = bytes(buffer[:size])
            del buffer[:size]
            self._serve(connection, frame)

    def _serve(self, connection: Any, frame: bytes) -> None:
        response = self.device.handle(frame)
        if response is None:
            # No power: the ring goes silent and the phone loses the link.
            if self._power_loss is None:
                loop = asyncio.get_running_loop()
                self._power_loss = loop.create_task(self._lose_power(connection))
            return
        self._outbox.put_nowait((connection, response))
        if self.device.reboot_requested:
            self._outbox.put_nowait((connection, b""))  # reboot once the answer is sent

    async def _lose_power(self, connection: Any) -> None:
        self.link.drop_pending()
        self._buffers.clear()
        await _disconnect(connection)
        assert self._peripheral is not None
        await self._peripheral.stop_advertising()

    async def _send_notifications(self) -> None:
        assert self._peripheral is not None and self._characteristic is not None
        while True:
            connection, response = await self._outbox.get()
            if not response:
                await _disconnect(connection)
                await self.restart()
                continue
            chunk = max(20, connection.att_mtu - 3)
            try:
                for offset in range(0, len(response), chunk):
                    await self._peripheral.notify_subscriber(
                        connection, self._characteristic, response[offset : offset + chunk]
                    )
            except Exception:  # the link dropped mid-answer; the client will retry
                continue


async def _disconnect(connection: Any) -> None:
    """Disconnect, treating "already disconnected" as done."""
    if connection.device.connections.get(connection.handle) is not connection:
        return  # already gone: Bumble would wait for a disconnection event that never comes
    try:
        async with asyncio.timeout(_DISCONNECT_TIMEOUT_S):
            await connection.disconnect()
    except Exception:  # Bumble raises several types for a connection that is going away
        return
