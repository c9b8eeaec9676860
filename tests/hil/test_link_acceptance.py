"""The device link against emulated devices, the same scenarios over a real pty and over BLE.

Serial: an emulated nRF52840 board on ``os.openpty()`` read through pyserial (smpclient's
serial transport), at 1 Mbaud 8N1 in real time. BLE: an emulated ring-gen3 as a Bumble GATT
server on a LocalLink paced like a 2M PHY radio, adopted by smpclient's Bumble transport.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from device_agent.link import DeviceRejected, Disconnected, LinkTimeout, ModelRc, UploadMismatch
from firmware_bundles.root import Root
from hil.director import LabDirector
from hil.faults import FaultyLink
from hil.model_store import SLOT_REGIONS
from hil.samples import heldout, run_reference, sample_model
from tests.hil.helpers import client_of, install, make_dut, run, running

TRANSPORTS = ["serial", "ble"]
PROBE = heldout(3, seed=99)[0]


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_install_infer_and_telemetry(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            # Confirmed, so the floor rises to it once it ran (docs/rollback.md).
            confirmed = {"wrist-activity": 5}
            uploaded, activated, tested = await install(dut, bundles["v1"], director, confirmed)
            assert uploaded.length == len(bundles["v1"]) and uploaded.resumed_from == 0
            assert activated.state == "testing" and activated.model_version == "1.0.0"
            assert tested.passed and tested.state == "active" and tested.vectors == 3
            client = await client_of(dut)
            slots = await client.slots()
            assert slots.active == activated.slot and slots.confirmed
            assert slots.counters == {"wrist-activity": 5}
            for row in PROBE:
                result = await client.infer({"input": row[None, :]})
                expected = run_reference(sample_model(0).onnx_bytes, row[None, :])
                np.testing.assert_allclose(result.outputs["probabilities"], expected, atol=1e-6)
            read = await client.read_telemetry()
            assert sum(w.inference_count for _, w in read.windows) == len(PROBE)
            assert all(w.device_id == dut.emulated.device_id for _, w in read.windows)
            assert await client.ack_telemetry(read.windows[-1][0]) == 0
            assert (await client.read_telemetry()).windows == []

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("seed", [3, 17])
def test_upload_resumes_at_the_device_offset_after_a_disconnect(
    kind: str, seed: int, tmp_path: Path, root: Root, bundles: dict[str, bytes]
) -> None:
    bundle = bundles["padded"]
    cut = random.Random(seed).randrange(len(bundle) // 10, len(bundle) * 6 // 10)

    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            dut.wrap = lambda link: FaultyLink(link, cut_at_offset=cut, on_cut=dut.drop)
            client = await dut.connect()
            with pytest.raises(Disconnected, match="injected disconnect"):
                await client.upload_model(bundle)
            dut.wrap = None
            client = await dut.connect()
            before = await client.slots()
            staged = before.slots[0]
            assert staged.state == "uploading" and staged.off is not None and staged.off > 0
            resumed = await client.upload_model(bundle)
            assert resumed.resumed_from == staged.off, f"cut at {cut}"
            stats = dut.call(lambda device: device.store.stats)
            # Every byte was written once: the second session never started again from zero.
            assert stats.upload_bytes_written == len(bundle)
            assert stats.upload_sessions == 1 and stats.resumed_sessions == 1
            assert (await client.slots()).slots[0].state == "uploaded"

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_bit_flip_in_transit_is_detected_and_activation_refused(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    bundle = bundles["v1"]

    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            dut.wrap = lambda link: FaultyLink(link, flip_bit_at=len(bundle) // 3)
            client = await dut.connect()
            identity = await client.identity()
            with pytest.raises(UploadMismatch):
                await client.upload_model(bundle)
            assert (await client.slots()).slots[0].state == "corrupt"
            with pytest.raises(DeviceRejected) as refused:
                await client.activate(director.assign(identity, [bundle]))
            assert refused.value.rc == ModelRc.HASH_MISMATCH
            assert (await client.slots()).active is None

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_bit_flip_in_flash_is_detected_and_activation_refused(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    bundle = bundles["v1"]

    def flip(device: object) -> None:
        flash = device.flash  # type: ignore[attr-defined]
        byte = flash.read(SLOT_REGIONS[0], 1000, 1)
        flash.write(SLOT_REGIONS[0], 1000, bytes([byte[0] ^ 0x10]))

    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            client = await dut.connect()
            identity = await client.identity()
            await client.upload_model(bundle)
            dut.call(flip)
            with pytest.raises(DeviceRejected) as refused:
                await client.activate(director.assign(identity, [bundle]))
            assert refused.value.rc == ModelRc.HASH_MISMATCH
            assert "not assigned" in refused.value.reason

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("seed", [5, 42])
def test_power_cut_at_a_random_write_during_install_keeps_the_old_model(
    kind: str,
    seed: int,
    tmp_path: Path,
    root: Root,
    bundles: dict[str, bytes],
    director: LabDirector,
) -> None:
    old_outputs = run_reference(sample_model(0).onnx_bytes, PROBE[:1])
    new_outputs = run_reference(sample_model(1).onnx_bytes, PROBE[:1])
    assert not np.allclose(old_outputs, new_outputs)

    async def scenario() -> None:
        dut = make_dut(kind, tmp_path, root)
        async with running(dut):
            await install(dut, bundles["v1"], director)
            await dut.disconnect()
            flash_file = dut.call(lambda device: device.flash.path)
            snapshot = tmp_path / "after-v1.flash"
            dut.call(lambda device: shutil.copyfile(device.flash.path, snapshot))
            # A clean install of v2 counts the flash writes an install takes.
            before = dut.call(lambda device: device.flash.operations)
            await install(dut, bundles["v2"], director)
            writes = dut.call(lambda device: device.flash.operations) - before
            await dut.disconnect()
            # Back to v1 only, then cut the power at a random one of those writes.
            dut.call(lambda device: shutil.copyfile(snapshot, flash_file))
            await dut.restart()
            cut = random.Random(seed).randint(1, writes)
            dut.call(lambda device: device.cut_power_at(cut))
            with pytest.raises((LinkTimeout, Disconnected)):
                await install(dut, bundles["v2"], director)
            assert not dut.call(lambda device: device.alive), f"cut {cut} of {writes}"
            await dut.drop()
            await dut.restart()
            client = await dut.connect()
            slots = await client.slots()
            active = slots.slots[slots.active or 0]
            assert slots.confirmed and active.version == "1.0.0", f"cut {cut} of {writes}"
            result = await client.infer({"input": PROBE[:1]})
            np.testing.assert_allclose(result.outputs["probabilities"], old_outputs, atol=1e-6)

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_release_counter_rollback_is_refused(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            await install(dut, bundles["v1"], director, {"wrist-activity": 5})  # confirmed 5
            client = await client_of(dut)
            identity = await client.identity()
            await client.upload_model(bundles["old"])  # counter 3
            with pytest.raises(DeviceRejected) as refused:
                await client.activate(director.assign(identity, [bundles["old"]]))
            assert refused.value.rc == ModelRc.ROLLBACK
            assert "below 5" in refused.value.reason
            assert (await client.slots()).counters == {"wrist-activity": 5}

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_wrong_hardware_id_is_refused(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            client = await dut.connect()
            identity = await client.identity()
            await client.upload_model(bundles["v1"])
            other = "ring-gen4" if identity.hardware_id != "ring-gen4" else "ring-gen3"
            envelope = director.assign(identity, [bundles["v1"]], hardware_id=other)
            with pytest.raises(DeviceRejected) as refused:
                await client.activate(envelope)
            assert refused.value.rc == ModelRc.WRONG_HARDWARE
            assert other in refused.value.reason
            assert (await client.slots()).active is None

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_bundle_over_the_flash_budget_is_refused_with_its_reason(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes]
) -> None:
    huge = bundles["huge"]

    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            client = await dut.connect()
            budget = (await client.identity()).max_bundle_bytes
            with pytest.raises(DeviceRejected) as refused:
                await client.upload_model(huge)
            assert refused.value.rc == ModelRc.TOO_LARGE
            assert refused.value.reason == (
                f"bundle is {len(huge)} bytes, over the {budget} byte budget by"
                f" {len(huge) - budget}"
            )
            assert await client.echo("still answering") == "still answering"

    run(scenario())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_corrupt_upload_is_uploaded_again_not_resumed(
    kind: str, tmp_path: Path, root: Root, bundles: dict[str, bytes], director: LabDirector
) -> None:
    bundle = bundles["v1"]

    async def scenario() -> None:
        async with running(make_dut(kind, tmp_path, root)) as dut:
            dut.wrap = lambda link: FaultyLink(link, flip_bit_at=100)
            client = await dut.connect()
            with pytest.raises(UploadMismatch):
                await client.upload_model(bundle)
            again = await client.upload_model(bundle)  # the flip fires once
            assert again.resumed_from == 0
            identity = await client.identity()
            activated = await client.activate(director.assign(identity, [bundle]))
            assert activated.state == "testing"

    run(scenario())
