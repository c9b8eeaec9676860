"""The client's pipelining, inference and telemetry against an emulated ring (simulator link)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from smp import header as smpheader

from device_agent.link import DeviceClient, DeviceRejected, MemoryLink, ModelRc
from firmware_bundles.root import Root
from hil.device import EmulatedDevice
from hil.director import LabDirector
from hil.profiles import profile_for
from hil.samples import sample_bundle
from tests.conftest import Keys

Body = Callable[[DeviceClient, EmulatedDevice], Coroutine[Any, Any, None]]


def _run(tmp_path: Path, root: Root, body: Body, *, drop_upload_frame: int | None = None) -> None:
    async def main() -> None:
        device = EmulatedDevice(
            profile_for("ring-gen3"), tmp_path / "r.flash", root, device_id="r1"
        )
        uploads = 0

        def handler(frame: bytes) -> bytes | None:
            nonlocal uploads
            header = smpheader.Header.loads(frame[:8])
            if (header.group_id, header.command_id) == (65, 2):
                uploads += 1
                if uploads == drop_upload_frame:
                    return None  # lost on the way: the device never sees it
            return device.handle(frame)

        client = DeviceClient(MemoryLink(handler))
        await client.connect()
        await body(client, device)

    asyncio.run(main())


async def _install(client: DeviceClient, keys: Keys, bundle: bytes) -> None:
    identity = await client.identity()
    await client.upload_model(bundle)
    await client.activate(LabDirector(keys.director[0]).assign(identity, [bundle]))
    await client.self_test()


def test_pipelined_upload_realigns_after_a_lost_request(
    tmp_path: Path, root: Root, keys: Keys
) -> None:
    bundle = sample_bundle(keys.release, ["ring-gen3"], padding_bytes=20_000)

    async def body(client: DeviceClient, device: EmulatedDevice) -> None:
        result = await client.upload_model(bundle)
        assert result.window == 4 and result.resumed_from == 0
        assert device.store.stats.upload_bytes_written == len(bundle)
        assert result.data_bytes_sent > len(bundle), "chunks after the lost one were re-sent"
        assert (await client.slots()).slots[0].state == "uploaded"

    _run(tmp_path, root, body, drop_upload_frame=3)


BAD_INPUTS = [
    ("wrong-feature-count", {"input": np.zeros((1, 5), np.float32)}, "input 'input' expected"),
    ("unknown-name", {"x": np.zeros((1, 4), np.float32)}, "unknown input 'x'"),
    ("wrong-dtype", {"input": np.zeros((1, 4), np.int32)}, "float32"),
    ("rank-three", {"input": np.zeros((1, 4, 1), np.float32)}, "input 'input' expected"),
]


@pytest.mark.parametrize(
    ("inputs", "reason"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_are_refused_naming_the_input(
    tmp_path: Path, root: Root, keys: Keys, inputs: dict[str, np.ndarray], reason: str
) -> None:
    bundle = sample_bundle(keys.release, ["ring-gen3"])

    async def body(client: DeviceClient, device: EmulatedDevice) -> None:
        await _install(client, keys, bundle)
        with pytest.raises(DeviceRejected) as refused:
            await client.infer(inputs)
        assert refused.value.rc == ModelRc.BAD_INPUT
        assert reason in refused.value.reason
        windows = (await client.read_telemetry()).windows
        assert sum(w.error_count for _, w in windows) == 1

    _run(tmp_path, root, body)


def test_infer_without_a_model_is_refused(tmp_path: Path, root: Root) -> None:
    async def body(client: DeviceClient, device: EmulatedDevice) -> None:
        with pytest.raises(DeviceRejected) as refused:
            await client.infer({"input": np.zeros((1, 4), np.float32)})
        assert refused.value.rc == ModelRc.NO_MODEL

    _run(tmp_path, root, body)


def test_telemetry_pieces_are_read_in_order_until_acknowledged(
    tmp_path: Path, root: Root, keys: Keys
) -> None:
    bundle = sample_bundle(keys.release, ["ring-gen3"])
    row = np.array([[0.1, -0.2, 0.3, 1.5]], np.float32)

    async def body(client: DeviceClient, device: EmulatedDevice) -> None:
        await _install(client, keys, bundle)
        for _ in range(2):
            await client.infer({"input": row})
        first = await client.read_telemetry()
        assert [(seq, w.inference_count) for seq, w in first.windows] == [(1, 2)]
        await client.infer({"input": row})
        page = await client.read_telemetry(max_windows=1)
        assert [seq for seq, _ in page.windows] == [1] and page.more
        assert await client.ack_telemetry(1) == 1
        rest = await client.read_telemetry()
        assert [(seq, w.inference_count) for seq, w in rest.windows] == [(2, 1)]
        assert not rest.more and rest.boot_epoch == first.boot_epoch
        window = rest.windows[0][1]
        assert window.model == "wrist-activity" and window.latency.count == 1
        assert [h.name for h in window.inputs] == [f"feature_{i}" for i in range(4)]
        assert sum(window.outputs[0].counts) == 1

    _run(tmp_path, root, body)
