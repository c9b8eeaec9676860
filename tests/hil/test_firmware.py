"""Firmware through the image group on the emulated board: smpclient's own upload, test, confirm.

The image goes over the real pty with smpclient's stop-and-wait ``SMPClient.upload()`` (as the
bench's baseline does) and with our pipelined upload; MCUboot's test-then-confirm keeps an
unconfirmed image from sticking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from smpclient import SMPClient

from device_agent.link import DeviceClient, SMPTransportLink
from firmware_bundles.root import Root
from hil.firmware import make_image
from tests.hil.helpers import make_dut, run, running


async def _versions(client: DeviceClient) -> dict[int, tuple[str, bool | None, bool | None]]:
    return {s.slot: (s.version, s.confirmed, s.pending) for s in await client.firmware_states()}


def test_firmware_test_reverts_unless_confirmed(tmp_path: Path, root: Root) -> None:
    image = make_image("1.5.0", bytes(range(256)) * 20)

    async def scenario() -> None:
        async with running(make_dut("serial", tmp_path, root)) as dut:
            client = await dut.connect()
            assert isinstance(client.link, SMPTransportLink)
            offsets = [
                off
                async for off in SMPClient(client.link.transport, dut.spec).upload(image, slot=1)
            ]
            assert offsets[-1] == len(image)
            states = await client.firmware_states()
            assert states[1].hash == hashlib.sha256(image).digest() and states[1].version == "1.5.0"
            assert (await client.identity()).firmware_version == "1.4.0"

            await client.set_firmware_state(hashlib.sha256(image).digest(), confirm=False)
            await client.reset()
            assert (await client.identity()).firmware_version == "1.5.0"
            assert (await _versions(client))[0] == ("1.5.0", False, None)

            await client.reset()  # not confirmed: the bootloader swaps the old image back
            assert (await client.identity()).firmware_version == "1.4.0"

            await client.set_firmware_state(hashlib.sha256(image).digest(), confirm=False)
            await client.reset()
            await client.set_firmware_state(None, confirm=True)
            await client.reset()
            assert (await client.identity()).firmware_version == "1.5.0"
            assert (await _versions(client))[0] == ("1.5.0", True, None)

    run(scenario())


def test_pipelined_firmware_upload_matches_its_sha(tmp_path: Path, root: Root) -> None:
    image = make_image("2.0.0", bytes(30_000))

    async def scenario() -> None:
        async with running(make_dut("serial", tmp_path, root)) as dut:
            client = await dut.connect()
            result = await client.upload_firmware(image)
            assert result.length == len(image) and result.window == 4
            assert (await client.firmware_states())[1].hash == hashlib.sha256(image).digest()

    run(scenario())
