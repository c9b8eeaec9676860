"""Helpers for the link and rig tests: emulated devices under test, installs, an asyncio runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from device_agent.link import DeviceClient, LinkSettings, UploadResult
from device_agent.link import model_group as mg
from firmware_bundles.root import Root
from hil.director import LabDirector
from hil.serial_device import UartTiming
from hil.targets import DeviceUnderTest, open_device

T = TypeVar("T")

#: Short timeouts: a device that stops answering (power cut) fails a test in seconds.
FAST = LinkSettings(
    request_timeout_s=2.0, upload_timeout_s=2.0, activate_timeout_s=10.0, connect_timeout_s=5.0
)
#: The emulated device each transport serves.
SPECS = {"serial": "emulated:devboard-nrf52840", "ble": "emulated:ring-gen3"}
#: Serial tests run the UART at 1 Mbaud (a USB-UART bridge's speed) to stay quick.
TEST_UART = UartTiming(1_000_000)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test scenario on a fresh event loop."""
    return asyncio.run(coro)


def make_dut(
    kind: str, work_dir: Path, root: Root, settings: LinkSettings = FAST
) -> DeviceUnderTest:
    """An emulated device under test reached over ``kind`` (``serial`` or ``ble``)."""
    return open_device(SPECS[kind], work_dir=work_dir, root=root, settings=settings, uart=TEST_UART)


@asynccontextmanager
async def running(dut: DeviceUnderTest) -> AsyncIterator[DeviceUnderTest]:
    """Power the device on for the block, off after it."""
    await dut.start()
    try:
        yield dut
    finally:
        await dut.stop()


async def client_of(dut: DeviceUnderTest) -> DeviceClient:
    """The current connection's client, connecting if there is none."""
    return dut.client if dut.client is not None else await dut.connect()


async def install(
    dut: DeviceUnderTest,
    bundle: bytes,
    director: LabDirector,
    confirmed: Mapping[str, int] | None = None,
) -> tuple[UploadResult, mg.ActivateResponse, mg.SelfTestResponse]:
    """Upload, activate under a fresh assignment set (naming ``confirmed`` counters), and
    self-test ``bundle``."""
    client = await client_of(dut)
    identity = await client.identity()
    uploaded = await client.upload_model(bundle)
    activated = await client.activate(director.assign(identity, [bundle], confirmed=confirmed))
    tested = await client.self_test()
    return uploaded, activated, tested
