"""The bundle manifest: what a bundle holds, what it runs on, and how it was made.

Release keys sign it; every field a device or the server relies on is here and typed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from firmware_bundles.schema import Document

MANIFEST_FORMAT = 1
#: Manifest format 2 adds ``runtime.format = "tflite"`` and the ``runtime.tflite`` block (issue
#: 14); a bundle of another format stays format 1, byte for byte what it was.
MANIFEST_FORMAT_TFLITE = 2
MANIFEST_PATH = "manifest.json"

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"

Sha256 = Annotated[str, Field(pattern=_SHA256)]
SemVer = Annotated[str, Field(min_length=5, max_length=64)]


def check_semver(value: str) -> str:
    """Return ``value`` if it is a semantic version (https://semver.org), else raise ValueError."""
    if not _SEMVER.match(value):
        raise ValueError(f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    return value


def semver_key(value: str) -> tuple[int, int, int, int, str]:
    """Sort key for semantic versions; a pre-release sorts before its release."""
    m = _SEMVER.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a semantic version")
    pre = m.group(4)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre or "")


class FirmwareRange(Document):
    """Firmware versions a bundle or target accepts: ``minimum <= v < below``."""

    minimum: str
    below: str | None = None

    @field_validator("minimum", "below")
    @classmethod
    def _semver(cls, v: str | None) -> str | None:
        return None if v is None else check_semver(v)

    def contains(self, version: str) -> bool:
        """Whether firmware ``version`` lies in this range."""
        key = semver_key(version)
        if key < semver_key(self.minimum):
            return False
        return self.below is None or key < semver_key(self.below)


class TargetRef(Document):
    """One device target a bundle is built for (an id in the target catalogue)."""

    target_id: str = Field(pattern=_NAME)
    generation: str
    platform: str
    firmware: FirmwareRange


class RamEstimate(Document):
    """Peak RAM estimate of running the model, and how it was obtained."""

    bytes: int = Field(ge=0)
    method: str


# --- runtime.tflite (manifest format 2) ------------------------------------------------------


class TensorQuantisation(Document):
    """Affine quantisation of an integer tensor: ``real = (q - zero_point) * scale``."""

    scale: float = Field(gt=0)
    zero_point: int


class TfliteTensor(Document):
    """The ``.tflite`` side of the model's (single) input or output.

    ``layout`` (inputs only) names the axes the ``.tflite`` expects: onnx2tf turns NCW into NWC
    and NCHW into NHWC, so a device transposes the manifest's input before it quantises it.
    """

    dtype: Literal["float32", "int8", "int16"]
    shape: list[int] = Field(min_length=1)
    layout: Literal["NC", "NWC", "NHWC"] | None = None
    quantisation: TensorQuantisation | None = None

    @model_validator(mode="after")
    def _integer_is_quantised(self) -> TfliteTensor:
        if (self.dtype != "float32") != (self.quantisation is not None):
            raise ValueError("an int8/int16 tensor needs quantisation, a float32 one has none")
        return self


class TfliteRuntime(Document):
    """How a TFLite Micro device runs the ``.tflite`` (only with ``format = "tflite"``)."""

    tflm_version: str = Field(min_length=1)
    input: TfliteTensor
    output: TfliteTensor


# --- end runtime.tflite -------------------------------------------------------------------


class Runtime(Document):
    """What the model needs from its runtime.

    For ``format = "tflite"`` the op types are TFLite builtin operator names, ``ram_estimate``
    is the arena TFLM measured, and ``tflite`` says how to feed and read the tensors.
    """

    model_file: str
    format: Literal["onnx", "ort", "tflite"]
    opset: int = Field(ge=1)
    op_types: list[str]
    min_onnxruntime: str | None = None
    precision: Literal["float32", "float16", "int8", "int16"]
    ram_estimate: RamEstimate
    tflite: TfliteRuntime | None = None

    @field_validator("op_types")
    @classmethod
    def _sorted_unique(cls, v: list[str]) -> list[str]:
        if v != sorted(set(v)):
            raise ValueError("op_types must be sorted and unique")
        return v

    @model_validator(mode="after")
    def _runtime_fields(self) -> Runtime:
        if (self.format == "tflite") != (self.tflite is not None):
            raise ValueError('runtime.tflite is required with format "tflite" and only then')
        if self.format != "tflite" and self.min_onnxruntime is None:
            raise ValueError(f"format {self.format!r} needs min_onnxruntime")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent optional fields are left out, so format-1 manifests serialise as before.
        data: dict[str, Any] = handler(self)
        for name in ("tflite", "min_onnxruntime"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class TensorSpec(Document):
    """One model input or output."""

    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool", "string"]
    shape: list[int | None]
    feature_names: list[str] | None = None
    class_labels: list[str] | list[int] | None = None


class Calibration(Document):
    """How static quantisation was calibrated."""

    method: str
    samples: int = Field(ge=1)
    data_sha256: Sha256


class Quantisation(Document):
    """How the chosen variant was made from the float model."""

    scheme: Literal["float32", "fp16", "int8-dynamic", "int8-static", "int16x8"]
    per_channel: bool = False
    calibration: Calibration | None = None
    quantised_ops: int = Field(ge=0)
    notes: str = ""


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


class SelfTestVector(Document):
    """One input with the output the model must give."""

    inputs: dict[str, list[Any]]
    expected: dict[str, list[Any]]


class SelfTest(Document):
    """Vectors a device runs after install, before it activates the model."""

    tolerance: float = Field(ge=0)
    vectors: list[SelfTestVector]


class Provenance(Document):
    """Where the model came from."""

    source_model_sha256: Sha256
    data_sha256: dict[str, Sha256] = Field(default_factory=dict)
    tool_versions: dict[str, str] = Field(default_factory=dict)
    builder: str = ""


class FileEntry(Document):
    """One file of the bundle."""

    path: str = Field(min_length=1, max_length=200)
    sha256: Sha256
    length: int = Field(ge=0)


class Manifest(Document):
    """The signed description of a bundle."""

    format: Literal[1, 2] = 1
    name: str = Field(pattern=_NAME)
    version: str
    release_counter: int = Field(ge=0)
    created_at: datetime
    task: Literal["classification", "regression"]
    targets: list[TargetRef] = Field(min_length=1)
    runtime: Runtime
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    quantisation: Quantisation
    metrics: dict[str, float]
    reference_histograms: ReferenceHistograms
    self_test: SelfTest
    provenance: Provenance
    files: list[FileEntry]

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_semver(v)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a timezone (UTC)")
        return v.astimezone(UTC)

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        paths = [f.path for f in self.files]
        if paths != sorted(set(paths)):
            raise ValueError("files must be sorted by path and unique")
        if MANIFEST_PATH in paths:
            raise ValueError(f"{MANIFEST_PATH} is reserved and cannot be listed in files")
        if self.runtime.model_file not in paths:
            raise ValueError(f"runtime.model_file {self.runtime.model_file!r} is not in files")
        if self.runtime.format == "tflite" and self.format < MANIFEST_FORMAT_TFLITE:
            raise ValueError(
                f'runtime.format "tflite" needs manifest format {MANIFEST_FORMAT_TFLITE}'
            )
        return self

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``.

        Raises:
            KeyError: If no such file is listed.
        """
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def target(self, target_id: str) -> TargetRef | None:
        """The target entry with id ``target_id``, if the bundle is built for it."""
        return next((t for t in self.targets if t.target_id == target_id), None)
