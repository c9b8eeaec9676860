"""Errors of pyserial, bleak, Bumble and smpclient become link errors where they enter.

The transport here is a stand-in written for this test (what the real transports raise cannot
be provoked on demand); the serial and BLE tests in tests/hil use the real ones.
"""

from __future__ import annotations

import asyncio

import pytest
import serial
from smpclient.transport import SMPTransportDisconnected

from device_agent.link import Disconnected, LinkError, SMPTransportLink


class StandInTransport:
    """Raises what it is told to, from the call it is told to."""

    max_unencoded_size = 128

    def __init__(self, fail_in: str, error: BaseException) -> None:
        self.fail_in = fail_in
        self.error = error

    async def connect(self, address: str, timeout_s: float) -> None:
        self._maybe("open")

    async def disconnect(self) -> None:
        self._maybe("close")

    async def send(self, data: bytes) -> None:
        self._maybe("send")

    async def receive(self) -> bytes:
        self._maybe("receive")
        return b""

    def initialize(self, buf_size: int) -> None:
        self._maybe("initialise")

    def _maybe(self, where: str) -> None:
        if where == self.fail_in:
            raise self.error


FOREIGN = [
    ("serial-exception-on-open", "open", serial.SerialException("could not open port")),
    ("port-vanished-on-send", "send", OSError(5, "Input/output error")),
    ("smp-disconnected-on-receive", "receive", SMPTransportDisconnected("peer disconnected")),
    ("connect-timeout", "open", TimeoutError("Failed to connect")),
]


@pytest.mark.parametrize(("where", "error"), [f[1:] for f in FOREIGN], ids=[f[0] for f in FOREIGN])
def test_foreign_link_failures_become_disconnected(where: str, error: Exception) -> None:
    async def scenario() -> None:
        link = SMPTransportLink(StandInTransport(where, error), "port", "serial:port")  # type: ignore[arg-type]
        with pytest.raises(Disconnected) as caught:
            await link.open()
            await link.send(b"frame")
            await link.receive()
        assert caught.value.__cause__ is error
        assert caught.value.link == "serial:port"
        assert str(caught.value).startswith(f"serial:port: {where} failed")

    asyncio.run(scenario())


def test_frame_over_the_buffer_is_our_error_not_a_disconnect() -> None:
    async def scenario() -> None:
        error = ValueError("Data size 300 exceeds maximum unencoded size 128")
        link = SMPTransportLink(StandInTransport("send", error), "p", "serial:p")  # type: ignore[arg-type]
        await link.open()
        with pytest.raises(LinkError) as caught:
            await link.send(bytes(300))
        assert not isinstance(caught.value, Disconnected)
        assert "frame refused by the transport" in str(caught.value)

    asyncio.run(scenario())


def test_a_link_that_is_not_open_refuses_to_send() -> None:
    async def scenario() -> None:
        link = SMPTransportLink(StandInTransport("none", ValueError()), "p", "serial:p")  # type: ignore[arg-type]
        with pytest.raises(Disconnected, match="not open"):
            await link.send(b"x")

    asyncio.run(scenario())


def test_programming_errors_are_not_disguised_as_disconnects() -> None:
    async def scenario() -> None:
        link = SMPTransportLink(StandInTransport("receive", KeyError("bug")), "p", "serial:p")  # type: ignore[arg-type]
        await link.open()
        with pytest.raises(KeyError):
            await link.receive()

    asyncio.run(scenario())


def test_bleak_link_to_an_absent_device_is_a_disconnect() -> None:
    """Real bleak: here without BlueZ (no D-Bus socket), elsewhere no such device in range."""
    from device_agent.link.ble import bleak_link

    async def scenario() -> None:
        link = bleak_link("AA:BB:CC:DD:EE:FF", connect_timeout_s=1.0)
        with pytest.raises(Disconnected) as caught:
            await link.open()
        assert caught.value.link == "ble:AA:BB:CC:DD:EE:FF"
        assert caught.value.__cause__ is not None

    asyncio.run(scenario())
