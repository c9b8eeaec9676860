"""The model group's wire format and the emulated device's answers to malformed requests.

Frames go straight to an emulated device's SMP handler (no transport), so the bytes checked
are exactly what firmware and apps see in ``docs/device-protocol.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import pytest
from smp import header as smpheader

from device_agent.link import model_group as mg
from firmware_bundles.root import Root
from hil.device import EmulatedDevice
from hil.profiles import profile_for


def _device(tmp_path: Path, root: Root) -> EmulatedDevice:
    return EmulatedDevice(
        profile_for("ring-gen3"), tmp_path / "ring.flash", root, device_id="ring-7"
    )


def _request(command: int, body: Any, op: smpheader.OP = smpheader.OP.WRITE) -> bytes:
    data = cbor2.dumps(body)
    header = smpheader.Header(
        op=op,
        version=smpheader.Version.V2,
        flags=smpheader.Flag(0),
        length=len(data),
        group_id=mg.MODEL_GROUP_ID,
        sequence=9,
        command_id=command,
    )
    return bytes(header) + data


def _answer(frame: bytes) -> tuple[smpheader.Header, Any]:
    header = smpheader.Header.loads(frame[: smpheader.Header.SIZE])
    return header, cbor2.loads(frame[smpheader.Header.SIZE :])


def test_identity_answer_carries_the_documented_keys(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    header, body = _answer(device.handle(_request(0, {}, smpheader.OP.READ)) or b"")
    assert header.op == smpheader.OP.READ_RSP and header.sequence == 9
    assert header.group_id == 65 and header.command_id == 0
    assert set(body) == {
        "device_id",
        "hardware_id",
        "firmware_version",
        "nonce",
        "boot_epoch",
        "protocol",
        "max_bundle_bytes",
        "ram_arena_bytes",
    }
    assert body["device_id"] == "ring-7" and body["hardware_id"] == "ring-gen3"
    assert body["firmware_version"] == "3.2.0" and body["protocol"] == 1
    assert body["max_bundle_bytes"] == 163840 and len(body["nonce"]) == 32
    again = _answer(device.handle(_request(0, {}, smpheader.OP.READ)) or b"")[1]
    assert again["nonce"] == body["nonce"], "the nonce stays until an activation uses it"


def test_nonce_and_boot_epoch_change_at_every_boot(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    first = _answer(device.handle(_request(0, {}, smpheader.OP.READ)) or b"")[1]
    device.boot()
    second = _answer(device.handle(_request(0, {}, smpheader.OP.READ)) or b"")[1]
    assert second["boot_epoch"] == first["boot_epoch"] + 1
    assert second["nonce"] != first["nonce"]


def test_refusal_is_an_smp_v2_error_with_a_reason(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    frame = device.handle(_request(3, {"assignment": b"{}"})) or b""
    header, body = _answer(frame)
    assert header.op == smpheader.OP.WRITE_RSP and header.command_id == 3
    assert body["err"] == {"group": 65, "rc": int(mg.ModelRc.NO_BUNDLE)}
    assert body["rsn"] == "no completed upload and no standby model in the inactive slot"


def test_unknown_command_gets_mgmt_enotsup(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    _, body = _answer(device.handle(_request(42, {})) or b"")
    assert body == {"rc": 8}


SHA = bytes(32)
MALFORMED = [
    ("upload-without-off", 2, {"data": b"x"}, "off"),
    ("upload-data-not-bytes", 2, {"off": 0, "data": "text", "len": 4, "sha": SHA}, "data"),
    ("upload-offset-0-without-sha", 2, {"off": 0, "data": b"x", "len": 4}, "len and a 32-byte sha"),
    ("upload-short-sha", 2, {"off": 0, "data": b"x", "len": 4, "sha": b"abc"}, "32-byte sha"),
    (
        "upload-zero-length",
        2,
        {"off": 0, "data": b"", "len": 0, "sha": SHA},
        "len must be positive",
    ),
    ("upload-unknown-key", 2, {"off": 0, "data": b"", "len": 4, "sha": SHA, "x": 1}, "x"),
    ("activate-without-assignment", 3, {}, "assignment"),
    ("telemetry-ack-upto-text", 6, {"upto": "all"}, "upto"),
    ("body-not-a-map", 2, [1, 2, 3], "body is not a CBOR map"),
]


@pytest.mark.parametrize(
    ("command", "body", "names"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_are_refused_naming_the_problem(
    tmp_path: Path, root: Root, command: int, body: Any, names: str
) -> None:
    device = _device(tmp_path, root)
    _, answer = _answer(device.handle(_request(command, body)) or b"")
    assert answer["err"] == {"group": 65, "rc": int(mg.ModelRc.BAD_REQUEST)}
    assert names in answer["rsn"]


def test_upload_past_the_announced_length_is_refused(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    device.handle(_request(2, {"off": 0, "data": b"12", "len": 4, "sha": SHA}))
    _, answer = _answer(device.handle(_request(2, {"off": 2, "data": b"345"})) or b"")
    assert answer["err"]["rc"] == mg.ModelRc.BAD_REQUEST
    assert answer["rsn"] == "3 bytes at 2 run past the bundle's 4"


def test_upload_without_a_session_says_so(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    _, answer = _answer(device.handle(_request(2, {"off": 100, "data": b"abc"})) or b"")
    assert answer["err"]["rc"] == mg.ModelRc.NO_SESSION


def test_out_of_order_chunk_is_answered_with_the_device_offset(tmp_path: Path, root: Root) -> None:
    device = _device(tmp_path, root)
    device.handle(_request(2, {"off": 0, "data": b"abcd", "len": 10, "sha": SHA}))
    _, answer = _answer(device.handle(_request(2, {"off": 7, "data": b"xyz"})) or b"")
    assert answer == {"off": 4}
    assert device.store.stats.upload_bytes_written == 4
