"""The bundle manifest: what a bundle holds, what it runs on, and how it was made.

Release keys sign it; every field a device or the server relies on is here and typed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from firmware_bundles.errors import MissingFileError
from firmware_bundles.provenance import MlflowSource
from firmware_bundles.reference import NO_HISTOGRAMS, ReferenceFile, ReferenceHistograms
from firmware_bundles.reference import REFERENCE_FILE as REFERENCE_FILE
from firmware_bundles.reference import Histogram as Histogram
from firmware_bundles.schema import Document
from firmware_bundles.schema import Sha256 as Sha256

#: The format converters write. Format 1 (self-test vectors as JSON in the manifest, ONNX and
#: ORT models only) and format 2 (vectors in a file, ``.tflite`` models) still read; format 3
#: moves the reference histograms out of the manifest into a binary file.
MANIFEST_FORMAT = 3
MANIFEST_FORMATS = (1, 2, 3)
MANIFEST_PATH = "manifest.json"
#: Where format-2 converters put the self-test tensors (any listed path is accepted).
SELF_TEST_FILE = "self_test.bin"

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
#: The semantic-version rule as a JSON Schema ``pattern``.
SEMVER_PATTERN = _SEMVER.pattern
_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"

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
    """One device target a bundle is built for (an id in the target catalogue).

    ``hardware_id`` is ``target_id`` in the signed manifest (docs/bundle-format.md, "Names").
    """

    hardware_id: str = Field(alias="target_id", pattern=_NAME)
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


class SelfTestVector(Document):
    """One input with the output the model must give."""

    inputs: dict[str, list[Any]]
    expected: dict[str, list[Any]]


class SelfTest(Document):
    """Format 1: vectors a device runs after install, before it activates the model, as JSON."""

    tolerance: float = Field(ge=0)
    vectors: list[SelfTestVector]


#: Bytes per element of the dtypes a self-test file can hold (raw little-endian).
TENSOR_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class TensorLayout(Document):
    """One tensor of a vector in the self-test file: raw little-endian, C order.

    With ``scale`` the tensor is stored quantised (int8, uint8 or int16: the model's own input
    type, from its input QuantizeLinear or its ``.tflite`` input tensor) and its value is
    ``float32(q - zero_point) * float32(scale)``, rounded to float32 once; the expected outputs
    were computed on exactly those values.
    """

    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]
    shape: list[int]
    scale: float | None = Field(default=None, gt=0)
    zero_point: int = 0

    @model_validator(mode="after")
    def _quantised(self) -> TensorLayout:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r} has a negative dimension")
        if self.scale is not None and self.dtype not in ("int8", "uint8", "int16"):
            raise ValueError(
                f"tensor {self.name!r}: only int8, uint8 and int16 tensors take a scale"
            )
        if self.scale is None and self.zero_point != 0:
            raise ValueError(f"tensor {self.name!r}: a zero_point needs a scale")
        return self

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * TENSOR_ITEMSIZE[self.dtype]


class SelfTestFile(Document):
    """Format 2: self-test vectors as binary tensors in a bundle file.

    The file holds ``count`` vectors one after another; each is its ``inputs``, its
    ``expected`` outputs, then its ``float_outputs``, in the order listed here, with no padding.
    Reading a bundle (never the manifest alone) decodes them into :attr:`vectors`, the same shape
    format 1 gives, and :attr:`float_vectors`.

    ``expected`` are the bundled model's own outputs (a device's runtime must give them within
    ``tolerance``). ``float_outputs``, when listed, are the float original's outputs (the trained
    model before export and quantisation) for the same inputs: what the quantised model stands
    for, which a test rig compares the device's outputs with within ``float_tolerance``.
    """

    tolerance: float = Field(ge=0)
    file: str = Field(min_length=1, max_length=200)
    count: int = Field(ge=0, le=1024)
    inputs: list[TensorLayout] = Field(min_length=1)
    expected: list[TensorLayout] = Field(min_length=1)
    float_outputs: list[TensorLayout] = Field(default_factory=list)
    float_tolerance: float | None = Field(default=None, ge=0)
    _vectors: list[SelfTestVector] | None = PrivateAttr(default=None)
    _float_vectors: list[dict[str, list[Any]]] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _float_outputs_named(self) -> SelfTestFile:
        if bool(self.float_outputs) != (self.float_tolerance is not None):
            raise ValueError("float_outputs and float_tolerance come together")
        expected = {t.name for t in self.expected}
        for layout in self.float_outputs:
            if layout.name not in expected:
                raise ValueError(f"float output {layout.name!r} is not an expected output")
        return self

    @property
    def vector_bytes(self) -> int:
        """Bytes of one vector in the file."""
        return sum(t.nbytes for t in [*self.inputs, *self.expected, *self.float_outputs])

    @property
    def vectors(self) -> list[SelfTestVector]:
        """The decoded vectors.

        Raises:
            MissingFileError: If the manifest was parsed alone, not read from its bundle.
        """
        if self._vectors is None:
            raise self._not_decoded()
        return self._vectors

    @property
    def float_vectors(self) -> list[dict[str, list[Any]]]:
        """The float original's outputs per vector, by output name (empty dicts if not listed).

        Raises:
            MissingFileError: If the manifest was parsed alone, not read from its bundle.
        """
        if self._float_vectors is None:
            raise self._not_decoded()
        return self._float_vectors

    def _not_decoded(self) -> MissingFileError:
        return MissingFileError(
            f"self-test vectors are in the bundle file {self.file!r}; read the bundle"
            " (open_bundle, verify, BundleReader), not the manifest alone",
            self.file,
        )

    def __eq__(self, other: object) -> bool:
        # Decoded vectors are a cache of the file; manifests are equal on their fields.
        return isinstance(other, SelfTestFile) and self.__dict__ == other.__dict__

    __hash__ = Document.__hash__


class Provenance(Document):
    """Where the model came from (``mlflow``: the registry entry and run, when it came from one)."""

    source_model_sha256: Sha256
    data_sha256: dict[str, Sha256] = Field(default_factory=dict)
    tool_versions: dict[str, str] = Field(default_factory=dict)
    builder: str = ""
    # Left out when absent, so manifests without it serialise exactly as before it existed.
    mlflow: MlflowSource | None = Field(default=None, exclude_if=lambda v: v is None)


class FileEntry(Document):
    """One file of the bundle."""

    path: str = Field(min_length=1, max_length=200)
    sha256: Sha256
    length: int = Field(ge=0)


class Manifest(Document):
    """The signed description of a bundle."""

    format: Literal[1, 2, 3] = 1
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
    reference_histograms: ReferenceHistograms | ReferenceFile
    self_test: SelfTest | SelfTestFile
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
        if self.runtime.format == "tflite" and self.format < 2:
            raise ValueError('runtime.format "tflite" needs manifest format 2')
        self._check_self_test()
        self._check_reference(paths)
        return self

    def _check_reference(self, paths: list[str]) -> None:
        refs = self.reference_histograms
        if self.format < 3:
            if not isinstance(refs, ReferenceHistograms):
                raise ValueError(
                    f"format {self.format} keeps reference_histograms in the manifest"
                    " (inputs and outputs)"
                )
            return
        if not isinstance(refs, ReferenceFile):
            raise ValueError(
                f"format {self.format} keeps reference histograms in a file"
                " (reference_histograms.file)"
            )
        if refs.detached and refs.file in paths:
            raise ValueError(
                f"reference_histograms.file {refs.file!r} is pinned as detached (sha256,"
                " length) but also listed in files"
            )
        if not refs.detached and refs.file not in paths:
            raise ValueError(
                f"reference_histograms.file {refs.file!r} is not in files (a detached"
                " reference gives its sha256 and length)"
            )

    def _check_self_test(self) -> None:
        test = self.self_test
        if self.format == 1:
            if not isinstance(test, SelfTest):
                raise ValueError("format 1 keeps self_test.vectors in the manifest")
            return
        if not isinstance(test, SelfTestFile):
            raise ValueError(
                f"format {self.format} keeps self-test vectors in a file (self_test.file)"
            )
        entry = next((f for f in self.files if f.path == test.file), None)
        if entry is None:
            raise ValueError(f"self_test.file {test.file!r} is not in files")
        if entry.length != test.count * test.vector_bytes:
            raise ValueError(
                f"self_test.file {test.file!r} is {entry.length} bytes; {test.count} vectors"
                f" of {test.vector_bytes} bytes need {test.count * test.vector_bytes}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; from format 2 on, fields at their defaults are left out.

        Parsing restores the defaults, so the document means the same and is shorter.
        """
        if self.format == 1:
            return super().to_dict()
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def telemetry_histograms(self) -> ReferenceHistograms:
        """The histograms a device counts its telemetry on: the reference's bins, or none when
        the reference is detached (a device has only its bundle; it then counts outputs by
        argmax, as without reference output histograms).

        Raises:
            MissingFileError: If the reference is in the bundle's file and the manifest was
                parsed alone.
        """
        refs = self.reference_histograms
        if isinstance(refs, ReferenceFile):
            return NO_HISTOGRAMS if refs.detached else refs.histograms
        return refs

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``.

        Raises:
            KeyError: If no such file is listed.
        """
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def target(self, hardware_id: str) -> TargetRef | None:
        """The target entry of ``hardware_id``, if the bundle is built for it."""
        return next((t for t in self.targets if t.hardware_id == hardware_id), None)
