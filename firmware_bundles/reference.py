"""Reference histograms: the training-data distributions drift is measured against.

Manifest formats 1 and 2 carry them as JSON (:class:`ReferenceHistograms`); format 3 keeps them
in a binary file (:class:`ReferenceFile`, layout in docs/bundle-format.md), in the bundle or
published beside it. :func:`encode` and :func:`decode` are the one codec of that file. No numpy:
the formats install without it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from firmware_bundles.errors import (
    HashMismatchError,
    LengthMismatchError,
    MissingFileError,
    SchemaError,
)
from firmware_bundles.schema import Document, Sha256

#: Where format-3 converters put the reference file (any listed path is accepted).
REFERENCE_FILE = "reference.bin"
#: A detached reference file sits beside its bundle: ``x.efb`` -> ``x.reference.bin``.
DETACHED_SUFFIX = ".reference.bin"
MAGIC = b"EFRH"
LAYOUT_VERSION = 1
#: Header: magic, layout version, bytes per count, input and output histogram counts.
_HEADER = struct.Struct("<4sBBHH")
#: Histogram kinds in the file.
NUMERIC, CATEGORICAL_INT, CATEGORICAL_STR = 0, 1, 2
_COUNT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_MAX_NAME_BYTES = 255
_MAX_BINS = 0xFFFF


class Histogram(Document):
    """Reference distribution of one input feature or output, on training data.

    Numeric: ``counts[0]`` is below ``edges[0]``, ``counts[i]`` is in ``[edges[i-1], edges[i])``,
    ``counts[-1]`` is at or above ``edges[-1]``. Categorical: one count per category plus a last
    count for unseen categories.
    """

    name: str
    kind: Literal["numeric", "categorical"]
    edges: list[float] = Field(default_factory=list)
    categories: list[str] | list[int] = Field(default_factory=list)
    counts: list[int]

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        bins = len(self.edges) if self.kind == "numeric" else len(self.categories)
        if len(self.counts) != bins + 1:
            raise ValueError(
                f"histogram {self.name!r} needs {bins + 1} counts, has {len(self.counts)}"
            )
        if self.kind == "numeric" and any(
            a >= b for a, b in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise ValueError(f"histogram {self.name!r} edges must increase strictly")
        if any(c < 0 for c in self.counts):
            raise ValueError(f"histogram {self.name!r} has a negative count")
        return self


class ReferenceHistograms(Document):
    """Input and output distributions that drift is measured against."""

    inputs: list[Histogram]
    outputs: list[Histogram]


#: What a device counts when it has no reference: nothing on inputs, argmax on outputs.
NO_HISTOGRAMS = ReferenceHistograms(inputs=[], outputs=[])


class ReferenceFile(Document):
    """Format 3: the reference histograms in a binary file (docs/bundle-format.md).

    In the bundle, ``file`` is listed in the manifest's ``files`` like any member, and reading
    the bundle decodes it. Detached, the file is published beside the bundle instead (a device
    never gets it) and ``sha256`` and ``length`` pin it here; whoever holds it (the server)
    attaches it with :func:`attach`.
    """

    file: str = Field(min_length=1, max_length=200)
    sha256: Sha256 | None = None
    length: int | None = Field(default=None, ge=0)
    _histograms: ReferenceHistograms | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _pinned_together(self) -> ReferenceFile:
        if (self.sha256 is None) != (self.length is None):
            raise ValueError("a detached reference gives both sha256 and length")
        return self

    @property
    def detached(self) -> bool:
        """Whether the file is published beside the bundle rather than in it."""
        return self.sha256 is not None

    @property
    def attached(self) -> bool:
        """Whether the histograms were decoded (from the bundle or a detached file)."""
        return self._histograms is not None

    @property
    def histograms(self) -> ReferenceHistograms:
        """The decoded histograms.

        Raises:
            MissingFileError: If the file was not read (a manifest parsed alone, or a detached
                file nobody attached).
        """
        if self._histograms is None:
            where = "published beside the bundle" if self.detached else "in the bundle"
            raise MissingFileError(
                f"reference histograms are in the file {self.file!r} {where}; read it"
                " (open_bundle, verify, BundleReader, or attach a detached one)",
                self.file,
            )
        return self._histograms

    @property
    def inputs(self) -> list[Histogram]:
        """The decoded input histograms (see :attr:`histograms`)."""
        return self.histograms.inputs

    @property
    def outputs(self) -> list[Histogram]:
        """The decoded output histograms (see :attr:`histograms`)."""
        return self.histograms.outputs

    def __eq__(self, other: object) -> bool:
        # Decoded histograms are a cache of the file; manifests are equal on their fields.
        return isinstance(other, ReferenceFile) and self.__dict__ == other.__dict__

    __hash__ = Document.__hash__


def detached_name(bundle_name: str) -> str:
    """The file name of the detached reference of the bundle file ``bundle_name``."""
    stem = bundle_name[: -len(".efb")] if bundle_name.endswith(".efb") else bundle_name
    return stem + DETACHED_SUFFIX


def attach(reference: ReferenceFile, data: bytes | memoryview) -> None:
    """Decode ``data`` as ``reference``'s file and keep the histograms on it.

    A detached file must be the one the manifest pins; a bundle's own file was hash-checked
    when the bundle was read.

    Raises:
        LengthMismatchError: If a detached file's length is not the pinned one.
        HashMismatchError: If its SHA-256 is not the pinned one.
        SchemaError: If the file is not a valid reference file.
    """
    if reference.detached:
        if len(data) != reference.length:
            raise LengthMismatchError(
                f"reference file is {len(data)} bytes, the manifest pins {reference.length}",
                reference.file,
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != reference.sha256:
            raise HashMismatchError(
                f"reference file has SHA-256 {digest}, the manifest pins {reference.sha256}",
                reference.file,
            )
    reference._histograms = decode(data)


# --- the file ---------------------------------------------------------------------------------


def _problem(message: str) -> SchemaError:
    return SchemaError("reference", [message], [REFERENCE_FILE])


def _count_width(histograms: list[Histogram]) -> int:
    top = max((c for h in histograms for c in h.counts), default=0)
    for width in _COUNT_CODES:
        if top < 1 << (8 * width):
            return width
    raise _problem(f"a count of {top} does not fit 64 bits")


def _float32_exact(value: float) -> bool:
    try:
        return bool(struct.unpack("<f", struct.pack("<f", value))[0] == value)
    except OverflowError:
        return False


def _short_text(value: str, what: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > _MAX_NAME_BYTES:
        raise _problem(f"{what} is {len(data)} bytes of UTF-8, over {_MAX_NAME_BYTES}")
    return bytes([len(data)]) + data


def _record(histogram: Histogram, width: int) -> bytes:
    where = f"histogram {histogram.name!r}"
    if not histogram.name:
        raise _problem("a histogram needs a name")
    if histogram.kind == "numeric":
        values: list[float] | list[str] | list[int] = histogram.edges
        bad = [e for e in histogram.edges if not _float32_exact(e)]
        if bad:
            raise _problem(f"{where}: edge {bad[0]!r} is not a float32 value")
        kind, body = NUMERIC, struct.pack(f"<{len(values)}f", *values)
    elif all(isinstance(c, int) for c in histogram.categories):
        values = histogram.categories
        if any(not -(1 << 63) <= int(c) < 1 << 63 for c in values):
            raise _problem(f"{where}: a category does not fit int64")
        kind, body = CATEGORICAL_INT, struct.pack(f"<{len(values)}q", *values)
    else:
        values = histogram.categories
        kind = CATEGORICAL_STR
        body = b"".join(_short_text(str(c), f"{where}: category {c!r}") for c in values)
    if len(values) > _MAX_BINS:
        raise _problem(f"{where}: {len(values)} bins, over {_MAX_BINS}")
    parts = [bytes([kind]), _short_text(histogram.name, f"{where}: its name")]
    parts += [struct.pack("<H", len(values)), body]
    parts.append(struct.pack(f"<{len(histogram.counts)}{_COUNT_CODES[width]}", *histogram.counts))
    return b"".join(parts)


def encode(reference: ReferenceHistograms) -> bytes:
    """The reference file's bytes for ``reference`` (deterministic: same histograms, same bytes).

    Counts take the fewest bytes (1, 2, 4 or 8) that hold the largest of them.

    Raises:
        SchemaError: If a histogram cannot be stored: an edge that is not a float32 value, a
            name or category over 255 bytes of UTF-8, more than 65,535 bins or histograms.
    """
    everything = [*reference.inputs, *reference.outputs]
    if max(len(reference.inputs), len(reference.outputs)) > _MAX_BINS:
        raise _problem(f"more than {_MAX_BINS} input or output histograms")
    width = _count_width(everything)
    header = _HEADER.pack(
        MAGIC, LAYOUT_VERSION, width, len(reference.inputs), len(reference.outputs)
    )
    return header + b"".join(_record(h, width) for h in everything)


class _Reader:
    """Reads the file front to back; running out of bytes is a schema error naming the place."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.offset + size
        if end > len(self.data):
            raise _problem(
                f"{what}: needs {size} bytes at byte {self.offset}, the file has"
                f" {len(self.data) - self.offset} left"
            )
        piece = self.data[self.offset : end]
        self.offset = end
        return piece

    def unpack(self, code: str, count: int, size: int, what: str) -> tuple[Any, ...]:
        return struct.unpack(f"<{count}{code}", self.take(count * size, what))

    def text(self, what: str) -> str:
        size = self.take(1, what)[0]
        try:
            return bytes(self.take(size, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise _problem(f"{what} is not UTF-8") from None


def _read_record(reader: _Reader, index: int, width: int) -> dict[str, object]:
    where = f"histogram {index}"
    kind = reader.take(1, where)[0]
    name = reader.text(f"{where}: name")
    where = f"histogram {index} ({name!r})"
    (n,) = struct.unpack("<H", reader.take(2, f"{where}: bins"))
    record: dict[str, object] = {"name": name}
    if kind == NUMERIC:
        edges = [float(e) for e in reader.unpack("f", n, 4, f"{where}: edges")]
        if not all(math.isfinite(e) for e in edges):
            raise _problem(f"{where}: an edge is not a finite number")
        record.update(kind="numeric", edges=edges)
    elif kind == CATEGORICAL_INT:
        record.update(kind="categorical", categories=list(reader.unpack("q", n, 8, where)))
    elif kind == CATEGORICAL_STR:
        record.update(
            kind="categorical", categories=[reader.text(f"{where}: category") for _ in range(n)]
        )
    else:
        raise _problem(f"{where}: unknown kind {kind} (0 numeric, 1 and 2 categorical)")
    record["counts"] = list(reader.unpack(_COUNT_CODES[width], n + 1, width, f"{where}: counts"))
    return record


def decode(data: bytes | memoryview) -> ReferenceHistograms:
    """The histograms of a reference file.

    Raises:
        SchemaError: If the bytes are not a reference file (naming what and where), or a
            histogram in it is invalid (edges not increasing, a count missing).
    """
    reader = _Reader(data)
    magic, version, width, inputs, outputs = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    if magic != MAGIC:
        raise _problem(f"starts with {bytes(magic)!r}, not {MAGIC!r}: not a reference file")
    if version != LAYOUT_VERSION:
        raise _problem(f"layout version {version}; this reader knows {LAYOUT_VERSION}")
    if width not in _COUNT_CODES:
        raise _problem(f"counts of {width} bytes; 1, 2, 4 or 8 are allowed")
    records = [_read_record(reader, i, width) for i in range(inputs + outputs)]
    if reader.offset != len(reader.data):
        raise _problem(f"{len(reader.data) - reader.offset} bytes after the last histogram")
    return ReferenceHistograms.from_dict({"inputs": records[:inputs], "outputs": records[inputs:]})
