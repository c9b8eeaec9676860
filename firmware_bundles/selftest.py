"""Self-test vectors of format-2 manifests: binary tensors in a bundle file, decoded to lists.

Decoding gives the same nested lists format 1 keeps in JSON, so every runtime reads vectors one
way (``manifest.self_test.vectors``). No numpy: the formats install without it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from firmware_bundles.errors import LengthMismatchError, MissingFileError
from firmware_bundles.manifest import (
    TENSOR_ITEMSIZE,
    Manifest,
    SelfTestFile,
    SelfTestVector,
    TensorLayout,
)

#: struct codes of the self-test dtypes, little-endian.
_CODES = {
    "float32": "f",
    "float16": "e",
    "int64": "q",
    "int32": "i",
    "int16": "h",
    "int8": "b",
    "uint8": "B",
    "bool": "?",
}
_F32 = struct.Struct("<f")


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return float(_F32.unpack(_F32.pack(value))[0])


def _reshape(flat: list[Any], shape: list[int]) -> list[Any]:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def decode_tensor(layout: TensorLayout, data: bytes | memoryview) -> list[Any]:
    """One tensor as nested lists; a quantised one as its float32 values.

    Raises:
        LengthMismatchError: If ``data`` is not the tensor's size.
    """
    if len(data) != layout.nbytes:
        raise LengthMismatchError(
            f"self-test tensor {layout.name!r} is {len(data)} bytes, its layout needs"
            f" {layout.nbytes}"
        )
    count = layout.nbytes // TENSOR_ITEMSIZE[layout.dtype]
    values: list[Any] = list(struct.unpack(f"<{count}{_CODES[layout.dtype]}", data))
    if layout.scale is not None:
        # q - zero_point is exact; one float32 rounding of an exact product is what numpy's
        # float32 multiply gives, so the converter's expected outputs match bit for bit.
        scale = _float32(layout.scale)
        values = [_float32((q - layout.zero_point) * scale) for q in values]
    return _reshape(values, layout.shape)


def decode_vectors(
    test: SelfTestFile, data: bytes | memoryview
) -> tuple[list[SelfTestVector], list[dict[str, list[Any]]]]:
    """The vectors of a self-test file, and the float original's outputs of each.

    Raises:
        LengthMismatchError: If the file's length is not ``count`` vectors.
    """
    need = test.count * test.vector_bytes
    if len(data) != need:
        raise LengthMismatchError(
            f"self-test file {test.file!r} is {len(data)} bytes, its layout needs {need}",
            test.file,
        )
    view = memoryview(data)
    vectors, floats, offset = [], [], 0
    for _ in range(test.count):
        tensors: list[dict[str, list[Any]]] = [{}, {}, {}]
        for part, layouts in enumerate((test.inputs, test.expected, test.float_outputs)):
            for layout in layouts:
                tensors[part][layout.name] = decode_tensor(
                    layout, view[offset : offset + layout.nbytes]
                )
                offset += layout.nbytes
        vectors.append(SelfTestVector.model_construct(inputs=tensors[0], expected=tensors[1]))
        floats.append(tensors[2])
    return vectors, floats


def attach_vectors(manifest: Manifest, files: Mapping[str, bytes | memoryview]) -> None:
    """Decode a format-2 manifest's vectors from its (hash-checked) file; format 1 is unchanged.

    Raises:
        MissingFileError: If the self-test file is not among ``files``.
        LengthMismatchError: If it does not hold the listed vectors.
    """
    test = manifest.self_test
    if not isinstance(test, SelfTestFile):
        return
    if test.file not in files:
        raise MissingFileError(f"self-test file {test.file!r} is missing", test.file)
    test._vectors, test._float_vectors = decode_vectors(test, files[test.file])
