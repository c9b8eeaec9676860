"""Secondary verification on the emulated ring, attack by attack, and the install's outcomes.

Uses the simulator link (:class:`~device_agent.link.MemoryLink`: frames straight to the device's
SMP handler) so each case is a few lines; the transports are covered in tests/hil.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.link import DeviceClient, DeviceRejected, MemoryLink, ModelRc
from device_agent.link import model_group as mg
from firmware_bundles import SigningKey
from firmware_bundles.root import Root
from hil.device import EmulatedDevice
from hil.director import LabDirector
from hil.profiles import profile_for
from hil.samples import sample_bundle
from tests.conftest import Keys, onnx_runtime

TARGETS = ["ring-gen3"]


@dataclass
class Bench:
    device: EmulatedDevice
    client: DeviceClient
    director: LabDirector
    keys: Keys

    async def identity(self) -> mg.IdentityResponse:
        return await self.client.identity()

    async def install(self, bundle: bytes) -> mg.IdentityResponse:
        """Upload, activate (a set the director signs for a fresh nonce) and self-test
        ``bundle``; the identity that set was made for."""
        identity = await self.identity()
        await self.client.upload_model(bundle)
        await self.client.activate(self.director.assign(identity, [bundle]))
        await self.client.self_test()
        return identity


def _run(
    tmp_path: Path, root: Root, keys: Keys, body: Callable[[Bench], Coroutine[Any, Any, None]]
) -> None:
    async def main() -> None:
        device = EmulatedDevice(
            profile_for("ring-gen3"), tmp_path / "ring.flash", root, device_id="ring-7"
        )
        client = DeviceClient(MemoryLink(device.handle))
        await client.connect()
        await body(Bench(device, client, LabDirector(keys.director[0]), keys))

    asyncio.run(main())


def _bundle(keys: Keys, **kwargs: Any) -> bytes:
    kwargs.setdefault("release_counter", 4)
    return sample_bundle(keys.release, kwargs.pop("targets", TARGETS), **kwargs)


Case = Callable[[Bench, bytes, mg.IdentityResponse], bytes]


def _expired(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    old = LabDirector(bench.keys.director[0], clock=lambda: datetime.now(UTC) - timedelta(days=2))
    return old.assign(identity, [bundle])


def _signed_by_release_key(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    return LabDirector(bench.keys.release[0]).assign(identity, [bundle])


def _signed_by_stranger(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    return LabDirector(SigningKey.generate()).assign(identity, [bundle])


def _another_bundle(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    return bench.director.assign(identity, [_bundle(bench.keys, seed=3, version="2.0.0")])


def _tampered_signature(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    envelope = bench.director.assign(identity, [bundle])
    return envelope.replace(b'"release_counter":4', b'"release_counter":9')


def _version_mismatch(bench: Bench, bundle: bytes, identity: mg.IdentityResponse) -> bytes:
    good = bench.director.assign(identity, [bundle])
    entry = json.loads(good)["signed"]["bundles"][0]
    entry["version"] = "9.9.9"
    return bench.director.assign(identity, [], bundles=[entry])


ATTACKS: list[tuple[str, Case, ModelRc, str]] = [
    (
        "wrong-device",
        lambda b, x, i: b.director.assign(i, [x], device_id="ring-8"),
        ModelRc.WRONG_DEVICE,
        "addressed to device ring-8",
    ),
    (
        "wrong-hardware",
        lambda b, x, i: b.director.assign(i, [x], hardware_id="ring-gen4"),
        ModelRc.WRONG_HARDWARE,
        "for hardware ring-gen4",
    ),
    (
        "replayed-nonce",
        lambda b, x, i: b.director.assign(i, [x], nonce="ab" * 16),
        ModelRc.NONCE,
        "nonce differs",
    ),
    ("expired", _expired, ModelRc.EXPIRED, "expired at"),
    ("signed-by-release-key", _signed_by_release_key, ModelRc.SIGNATURE, "threshold not met"),
    ("signed-by-stranger", _signed_by_stranger, ModelRc.SIGNATURE, "threshold not met"),
    ("tampered-after-signing", _tampered_signature, ModelRc.SIGNATURE, "threshold not met"),
    ("assigns-another-bundle", _another_bundle, ModelRc.HASH_MISMATCH, "is not assigned"),
    ("manifest-disagrees", _version_mismatch, ModelRc.BUNDLE_INVALID, "assignment names"),
    ("not-an-envelope", lambda b, x, i: b"not json", ModelRc.BAD_REQUEST, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("make", "rc", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_activation_is_refused(
    tmp_path: Path, root: Root, keys: Keys, make: Case, rc: ModelRc, reason: str
) -> None:
    bundle = _bundle(keys)

    async def body(bench: Bench) -> None:
        identity = await bench.identity()
        await bench.client.upload_model(bundle)
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.activate(make(bench, bundle, identity))
        assert refused.value.rc == rc and refused.value.rc_name == rc.name
        assert reason in refused.value.reason
        slots = await bench.client.slots()
        assert slots.active is None and slots.slots[0].state == "uploaded"

    _run(tmp_path, root, keys, body)


MISFITS: list[tuple[str, dict[str, Any], str]] = [
    ("not-built-for-ring", {"targets": ["ring-gen4"]}, "built for ring-gen4, not ring-gen3"),
    (
        "ram-estimate-over-arena",
        {"draft_overrides": {"runtime": onnx_runtime(ram_bytes=70_000)}},
        "needs about 70000 bytes of RAM, arena is 65536",
    ),
    (
        "op-the-micro-runtime-lacks",
        {
            "draft_overrides": {
                "runtime": {
                    "model_file": "model.tflite",
                    "format": "tflite",
                    "opset": 17,
                    "op_types": ["FULLY_CONNECTED", "LSTM", "SOFTMAX"],
                    "precision": "float32",
                    "ram_estimate": {"bytes": 28, "method": "test"},
                    "tflite": {
                        "tflm_version": "test",
                        "input": {"dtype": "float32", "shape": [1, 4], "layout": "NC"},
                        "output": {"dtype": "float32", "shape": [1, 3]},
                    },
                }
            }
        },
        "ops not allowed: LSTM",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "reason"), [m[1:] for m in MISFITS], ids=[m[0] for m in MISFITS]
)
def test_bundle_that_does_not_fit_is_refused_with_every_reason(
    tmp_path: Path, root: Root, keys: Keys, kwargs: dict[str, Any], reason: str
) -> None:
    bundle = _bundle(keys, **kwargs)

    async def body(bench: Bench) -> None:
        identity = await bench.identity()
        await bench.client.upload_model(bundle)
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.activate(bench.director.assign(identity, [bundle]))
        assert refused.value.rc == ModelRc.DOES_NOT_FIT
        assert reason in refused.value.reason

    _run(tmp_path, root, keys, body)


def test_a_used_nonce_is_good_for_its_own_set_only(tmp_path: Path, root: Root, keys: Keys) -> None:
    first, second = _bundle(keys), _bundle(keys, seed=1, version="1.1.0", release_counter=5)

    async def body(bench: Bench) -> None:
        identity = await bench.install(first)
        await bench.client.upload_model(second)
        replay = bench.director.assign(identity, [second])  # another set, the used nonce
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.activate(replay)
        assert refused.value.rc == ModelRc.NONCE
        assert "used by another assignment set" in refused.value.reason
        fresh = await bench.identity()
        assert fresh.nonce != identity.nonce
        activated = await bench.client.activate(bench.director.assign(fresh, [second]))
        assert activated.model_version == "1.1.0"

    _run(tmp_path, root, keys, body)


def test_failed_self_test_reverts_to_the_previous_model(
    tmp_path: Path, root: Root, keys: Keys
) -> None:
    good = _bundle(keys)
    # Three vectors of zeros that claim [1, 0, 0]: the model gives about [0.3, 0.4, 0.3].
    vector = np.zeros(4, "<f4").tobytes() + np.asarray([1, 0, 0] * 2, "<f4").tobytes()
    bad = _bundle(
        keys, version="1.1.0", release_counter=5, file_overrides={"self_test.bin": vector * 3}
    )

    async def body(bench: Bench) -> None:
        confirmed = {"wrist-activity": 5}  # both confirmed: the floor follows what ran
        identity = await bench.identity()
        await bench.client.upload_model(good)
        await bench.client.activate(bench.director.assign(identity, [good], confirmed=confirmed))
        await bench.client.self_test()
        identity = await bench.identity()
        await bench.client.upload_model(bad)
        activated = await bench.client.activate(
            bench.director.assign(identity, [bad], confirmed=confirmed)
        )
        assert activated.state == "testing"
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.self_test()
        assert refused.value.rc == ModelRc.SELFTEST_FAILED
        assert "reverted to slot 0" in refused.value.reason
        slots = await bench.client.slots()
        assert slots.active == 0 and slots.confirmed
        assert [s.state for s in slots.slots] == ["active", "failed"]
        assert slots.counters == {"wrist-activity": 4}, "a failed install never raises it"
        telemetry = await bench.client.read_telemetry()
        assert sum(w.selftest_failure_count for _, w in telemetry.windows) == 1

    _run(tmp_path, root, keys, body)


def test_upload_over_an_unconfirmed_fallback_is_refused(
    tmp_path: Path, root: Root, keys: Keys
) -> None:
    first, second = _bundle(keys), _bundle(keys, seed=1, version="1.1.0", release_counter=5)

    async def body(bench: Bench) -> None:
        await bench.install(first)
        identity = await bench.identity()
        await bench.client.upload_model(second)
        await bench.client.activate(bench.director.assign(identity, [second]))
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.upload_model(first)
        assert refused.value.rc == ModelRc.BUSY

    _run(tmp_path, root, keys, body)


def test_a_rolled_back_entry_refuses_that_model_only(
    tmp_path: Path, root: Root, keys: Keys
) -> None:
    """A set whose entry for one model is below the ring's floor still activates another model
    it assigns; the rolled-back entry itself is refused, naming its model and floor."""
    first = _bundle(keys)  # wrist-activity, release counter 4
    older = _bundle(keys, seed=1, version="0.9.0", release_counter=3)
    other = _bundle(
        keys, seed=2, version="1.0.0", release_counter=1, draft_overrides={"name": "sleep-stage"}
    )

    async def body(bench: Bench) -> None:
        identity = await bench.identity()
        await bench.client.upload_model(first)
        confirmed = {"wrist-activity": 4, "sleep-stage": 1}
        await bench.client.activate(bench.director.assign(identity, [first], confirmed=confirmed))
        await bench.client.self_test()
        identity = await bench.identity()
        await bench.client.upload_model(older)
        with pytest.raises(DeviceRejected) as refused:
            await bench.client.activate(bench.director.assign(identity, [older, other]))
        assert refused.value.rc == ModelRc.ROLLBACK
        assert "wrist-activity" in refused.value.reason and "below 4" in refused.value.reason
        identity = await bench.identity()
        await bench.client.upload_model(other)
        activated = await bench.client.activate(
            bench.director.assign(identity, [older, other], confirmed=confirmed)
        )
        assert (activated.model, activated.model_version) == ("sleep-stage", "1.0.0")
        await bench.client.self_test()
        slots = await bench.client.slots()
        assert slots.counters == {"wrist-activity": 4, "sleep-stage": 1}

    _run(tmp_path, root, keys, body)


# -- going back (docs/rollback.md) ----------------------------------------------------------------


def _on_second(bench: Bench, first: bytes, second: bytes, confirmed: int | None) -> Any:
    """The ring ran ``first`` (4), then ``second`` (5) under a set naming ``confirmed``."""

    async def steps() -> None:
        identity = await bench.identity()
        await bench.client.upload_model(first)
        await bench.client.activate(bench.director.assign(identity, [first]))
        await bench.client.self_test()
        identity = await bench.identity()
        await bench.client.upload_model(second)
        named = {} if confirmed is None else {"wrist-activity": confirmed}
        await bench.client.activate(bench.director.assign(identity, [second], confirmed=named))
        await bench.client.self_test()

    return steps()


@pytest.mark.parametrize("confirmed", [None, 4], ids=["nothing-confirmed", "first-confirmed"])
def test_the_ring_goes_back_to_its_standby_slot_without_an_upload(
    tmp_path: Path, root: Root, keys: Keys, confirmed: int | None
) -> None:
    first, second = _bundle(keys), _bundle(keys, seed=1, version="1.1.0", release_counter=5)

    async def body(bench: Bench) -> None:
        await _on_second(bench, first, second, confirmed)
        uploads = bench.device.store.stats.upload_sessions
        identity = await bench.identity()
        named = {} if confirmed is None else {"wrist-activity": confirmed}
        activated = await bench.client.activate(
            bench.director.assign(identity, [first], confirmed=named)
        )
        assert (activated.slot, activated.model_version, activated.state) == (0, "1.0.0", "testing")
        await bench.client.self_test()
        assert bench.device.store.stats.upload_sessions == uploads, "no upload"
        slots = await bench.client.slots()
        assert slots.active == 0 and slots.confirmed
        assert [s.state for s in slots.slots] == ["active", "standby"]
        assert slots.counters.get("wrist-activity", 0) == (confirmed or 0)

    _run(tmp_path, root, keys, body)


@pytest.mark.parametrize(
    "lie", [None, 0], ids=["confirmation-left-out", "lower-confirmation-named"]
)
def test_a_director_only_rollback_below_the_confirmed_version_is_refused_by_the_ring(
    tmp_path: Path, root: Root, keys: Keys, lie: int | None
) -> None:
    """The second version confirmed (floor 5): a set signed with the director key alone that
    names the first, from the standby slot or uploaded again, is refused, across a reboot."""
    first, second = _bundle(keys), _bundle(keys, seed=1, version="1.1.0", release_counter=5)

    async def body(bench: Bench) -> None:
        await _on_second(bench, first, second, confirmed=5)
        bench.device.boot()
        named = {} if lie is None else {"wrist-activity": lie}
        for upload in (False, True):
            identity = await bench.identity()
            if upload:
                await bench.client.upload_model(first)
            with pytest.raises(DeviceRejected) as refused:
                await bench.client.activate(
                    bench.director.assign(identity, [first], confirmed=named)
                )
            assert refused.value.rc == ModelRc.ROLLBACK
            assert "wrist-activity" in refused.value.reason and "below 5" in refused.value.reason
        slots = await bench.client.slots()
        assert slots.active == 1 and slots.counters == {"wrist-activity": 5}

    _run(tmp_path, root, keys, body)
