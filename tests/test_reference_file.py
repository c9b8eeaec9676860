"""Manifest format 3: reference histograms in a binary file, in the bundle or detached beside it.

The file holds every histogram the JSON form holds; malformed files are refused naming what is
wrong; a bundle decodes its own file for every reader; a device never sees a detached one and
counts its outputs only; format-2 bundles (JSON reference) still verify and read the same.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from device_agent.histograms import TelemetryPlan
from firmware_bundles import (
    HashMismatchError,
    LengthMismatchError,
    MissingFileError,
    SchemaError,
    build,
    open_bundle,
    verify,
)
from firmware_bundles.bundle import file_entries
from firmware_bundles.manifest import Manifest
from firmware_bundles.reference import (
    MAGIC,
    NO_HISTOGRAMS,
    REFERENCE_FILE,
    ReferenceFile,
    ReferenceHistograms,
    attach,
    decode,
    encode,
)
from firmware_bundles.window_builder import TelemetryLayout
from hil.device_telemetry import DeviceTelemetry
from tests.conftest import MODEL_BYTES, Keys, format_3, manifest_draft

F32_TENTH = float(np.float32(0.1))
REFERENCE = ReferenceHistograms.from_dict(
    {
        "inputs": [
            {
                "name": "x0",
                "kind": "numeric",
                "edges": [-2.5, F32_TENTH, float(np.nextafter(np.float32(3), np.float32(9)))],
                "counts": [0, 7, 9, 0],
            },
            {"name": "constant", "kind": "numeric", "counts": [12]},
            {
                "name": "colour",
                "kind": "categorical",
                "categories": ["red", "blü"],
                "counts": [1, 2, 3],
            },
        ],
        "outputs": [
            {
                "name": "label",
                "kind": "categorical",
                "categories": [0, 1, 2],
                "counts": [5, 6, 7, 0],
            },
            {"name": "score", "kind": "numeric", "edges": [0.5], "counts": [2**40, 3]},
        ],
    }
)


def test_the_file_holds_every_histogram_the_json_form_holds() -> None:
    data = encode(REFERENCE)
    assert decode(data) == REFERENCE
    assert encode(decode(data)) == data  # deterministic: same histograms, same bytes
    assert data[:4] == MAGIC and data[5] == 8  # 2**40 needs 8-byte counts
    assert struct.unpack_from("<HH", data, 6) == (3, 2)
    assert len(data) < len(REFERENCE.to_bytes()) / 2


@pytest.mark.parametrize(
    ("largest", "width"), [(0, 1), (255, 1), (256, 2), (65535, 2), (65536, 4), (2**32, 8)]
)
def test_counts_take_the_fewest_bytes_that_hold_the_largest(largest: int, width: int) -> None:
    one = ReferenceHistograms.from_dict(
        {
            "inputs": [{"name": "x", "kind": "numeric", "edges": [0.0], "counts": [largest, 1]}],
            "outputs": [],
        }
    )
    data = encode(one)
    assert data[5] == width
    # Header, kind, name, bin count, one float32 edge, two counts.
    assert len(data) == 10 + 1 + 2 + 2 + 4 + 2 * width
    assert decode(data) == one


def _raw(*records: bytes, inputs: int | None = None, width: int = 1, head: bytes = MAGIC) -> bytes:
    count = len(records) if inputs is None else inputs
    return struct.pack("<4sBBHH", head, 1, width, count, 0) + b"".join(records)


def _numeric(name: bytes, edges: list[float], counts: list[int]) -> bytes:
    body = struct.pack(f"<{len(edges)}f", *edges) + bytes(counts)
    return bytes([0, len(name)]) + name + struct.pack("<H", len(edges)) + body


GOOD = encode(REFERENCE)
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "header: needs 10 bytes"),
    ("not-a-reference-file", b"PK\x03\x04" + GOOD[4:], "not a reference file"),
    ("layout-version-2", GOOD[:4] + b"\x02" + GOOD[5:], "layout version 2"),
    ("counts-of-3-bytes", GOOD[:5] + b"\x03" + GOOD[6:], "counts of 3 bytes"),
    ("cut-short", GOOD[:-1], r"'score'\): counts: needs 16 bytes"),
    ("a-byte-after-the-end", GOOD + b"\x00", "1 bytes after the last histogram"),
    ("more-histograms-than-written", _raw(_numeric(b"x", [0.0], [1, 1]), inputs=2), "histogram 1"),
    ("unknown-kind", _raw(b"\x09\x01x\x00\x00\x01"), "unknown kind 9"),
    ("name-not-utf8", _raw(_numeric(b"\xff", [0.0], [1, 1])), "not UTF-8"),
    ("edges-going-down", _raw(_numeric(b"x", [1.0, 0.0], [1, 1, 1])), "increase strictly"),
    ("nan-edge", _raw(_numeric(b"x", [float("nan")], [1, 1])), "not a finite number"),
]


@pytest.mark.parametrize(
    ("data", "message"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_a_malformed_file_is_a_schema_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode(data)


@pytest.mark.parametrize(
    ("histogram", "message"),
    [
        ({"name": "x", "kind": "numeric", "edges": [0.1], "counts": [1, 1]}, "not a float32"),
        ({"name": "x" * 256, "kind": "numeric", "counts": [1]}, "over 255"),
    ],
    ids=["edge-not-float32", "name-too-long"],
)
def test_a_histogram_the_file_cannot_hold_is_refused(
    histogram: dict[str, Any], message: str
) -> None:
    with pytest.raises(SchemaError, match=message):
        encode(ReferenceHistograms.from_dict({"inputs": [histogram], "outputs": []}))


def _v3(**pointer: Any) -> dict[str, Any]:
    draft, files, _ = format_3(manifest_draft(), {"model.onnx": MODEL_BYTES})
    if pointer:
        draft["reference_histograms"] = pointer
    return {**draft, "files": file_entries(files)}


BAD_MANIFESTS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    (
        "v3-with-json-reference",
        lambda: {**_v3(), "reference_histograms": manifest_draft()["reference_histograms"]},
        "keeps reference histograms in a file",
    ),
    (
        "v2-with-reference-file",
        lambda: {**_v3(), "format": 2},
        "format 2 keeps reference_histograms",
    ),
    ("file-not-listed", lambda: _v3(file="other.bin"), "'other.bin' is not in files"),
    (
        "detached-yet-listed",
        lambda: _v3(file=REFERENCE_FILE, sha256="0" * 64, length=3),
        "also listed in files",
    ),
    ("sha256-without-length", lambda: _v3(file="r.bin", sha256="0" * 64), "both sha256 and length"),
]


@pytest.mark.parametrize(
    ("make", "message"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS]
)
def test_an_inconsistent_reference_is_a_schema_error(
    make: Callable[[], dict[str, Any]], message: str
) -> None:
    assert Manifest.from_dict(_v3()).format == 3
    with pytest.raises(SchemaError, match=message):
        Manifest.from_dict(make())


def bundles(keys: Keys) -> tuple[bytes, bytes, bytes, bytes]:
    """The same model and reference as format 2 (JSON, as converters wrote it before format 3),
    format 3 with ``reference.bin`` inside, and format 3 detached; and the reference file."""
    base = manifest_draft()
    base["inputs"][0]["feature_names"] = ["x0", "x1", "x2", "x3"]
    inside, files, reference = format_3(base, {"model.onnx": MODEL_BYTES})
    detached, beside, _ = format_3(base, {"model.onnx": MODEL_BYTES}, detached=True)
    old = {**inside, "format": 2, "reference_histograms": base["reference_histograms"]}
    old_files = {k: v for k, v in files.items() if k != REFERENCE_FILE}
    return (
        build(old, old_files, keys.release),
        build(inside, files, keys.release),
        build(detached, beside, keys.release),
        reference,
    )


def test_format_2_and_3_bundles_verify_and_read_the_same_reference(keys: Keys, root: Any) -> None:
    old, inside, detached, reference = bundles(keys)
    v2, v3 = verify(old, root).manifest, verify(inside, root).manifest
    assert v2.format == 2 and v3.format == 3
    assert isinstance(v2.reference_histograms, ReferenceHistograms)
    assert isinstance(v3.reference_histograms, ReferenceFile)
    assert v3.reference_histograms.histograms == v2.reference_histograms
    assert v3.telemetry_histograms() == v2.telemetry_histograms()
    signed = open_bundle(inside).envelope.signed
    assert signed["reference_histograms"] == {"file": "reference.bin"}
    assert open_bundle(inside).files[REFERENCE_FILE] == reference
    # The manifest shrank by the JSON histograms; the file holds them in fewer bytes.
    assert len(reference) < len(str(open_bundle(old).envelope.signed["reference_histograms"]))
    assert verify(detached, root).manifest.format == 3


def test_the_reference_is_only_read_from_the_bundle(keys: Keys) -> None:
    contents = open_bundle(bundles(keys)[1])
    alone = Manifest.from_dict(contents.envelope.signed)
    with pytest.raises(MissingFileError, match="in the bundle; read it"):
        _ = alone.reference_histograms.inputs
    with pytest.raises(MissingFileError):
        alone.telemetry_histograms()
    assert alone == contents.manifest  # decoded histograms do not change what the manifest is


def test_a_changed_reference_file_is_refused_by_its_hash(keys: Keys, root: Any) -> None:
    data = bytearray(bundles(keys)[1])
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        data[tar.getmember(REFERENCE_FILE).offset_data + 12] ^= 1
    with pytest.raises(HashMismatchError, match=r"reference\.bin"):
        verify(bytes(data), root)


def test_a_detached_reference_is_pinned_and_attached_only_when_it_is_the_pinned_file(
    keys: Keys, root: Any
) -> None:
    _, _, detached, reference = bundles(keys)
    contents = open_bundle(detached)
    assert REFERENCE_FILE not in contents.files
    refs = contents.manifest.reference_histograms
    assert isinstance(refs, ReferenceFile) and refs.detached
    assert (refs.sha256, refs.length) == (hashlib.sha256(reference).hexdigest(), len(reference))
    with pytest.raises(MissingFileError, match="published beside the bundle"):
        _ = refs.inputs
    assert contents.manifest.telemetry_histograms() == NO_HISTOGRAMS  # devices never get it
    with pytest.raises(LengthMismatchError):
        attach(refs, reference + b"\x00")
    with pytest.raises(HashMismatchError):
        attach(refs, reference[:5] + bytes([reference[5] ^ 1]) + reference[6:])
    assert not refs.attached
    attach(refs, reference)
    assert refs.histograms == ReferenceHistograms.from_dict(
        manifest_draft()["reference_histograms"]
    )


def _plan(manifest: Manifest) -> list[tuple[Any, ...]]:
    plan = TelemetryPlan.from_manifest(manifest)
    return [
        (h.name, h.bins.kind, h.bins.edges, h.bins.categories)
        for h in (*plan.inputs, *plan.outputs)
    ]


def test_devices_count_the_same_bins_from_json_and_file_and_only_outputs_when_detached(
    keys: Keys,
) -> None:
    old, inside, detached, _ = bundles(keys)
    v2, v3, beside = (open_bundle(b).manifest for b in (old, inside, detached))
    assert _plan(v3) == _plan(v2) and [p[0] for p in _plan(v2)] == ["x0", "label"]
    assert TelemetryLayout.of(v3) == TelemetryLayout.of(v2)
    plan = TelemetryPlan.from_manifest(beside)
    assert plan.inputs == () and [(h.output, h.mode) for h in plan.outputs] == [
        ("probabilities", "argmax")
    ]
    layout = TelemetryLayout.of(beside)
    assert layout.inputs == {} and layout.outputs == {"probabilities": 3}
    # The emulated ring counts what the layout allows: argmax of its outputs, no inputs.
    ring = DeviceTelemetry("ring-1", 3600, lambda: datetime(2026, 6, 1, tzinfo=UTC))
    x = np.array([[0.5, -1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    ring.record(
        beside, "a" * 64, {"input": x}, {"probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])}, 0.001
    )
    ring.seal()
    [piece], _ = ring.read(None, 1 << 20)
    assert piece.window["inputs"] == []
    assert piece.window["outputs"] == [{"name": "probabilities", "counts": [1, 1, 0]}]
