"""What the API answers: one public model per resource, so the OpenAPI document gives every JSON
answer a schema (every object with its properties, or keys mapped to a typed value).

Bodies defined by the formats (check-in answer, trusted root) are described here from the
formats' own models, so the document follows them when they change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from firmware_bundles.manifest import Provenance
from firmware_bundles.messages import (
    AssignmentSet,
    CheckInResponse,
    DeviceId,
    InstalledModel,
    LatencySketch,
)
from firmware_bundles.root import Root
from server.drift import Drift
from server.quality_schemas import DataQualityFigures, FeatureQualityCounts


class RequestBody(BaseModel):
    """Base of request bodies: unknown fields are refused, as the schema says."""

    model_config = ConfigDict(extra="forbid")


def _json_integer(value: Any) -> Any:
    # JSON Schema's integer: 3 and 3.0, never true or "3" (which pydantic's lax mode takes).
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(minimum: int, maximum: int) -> Any:
    """An integer as JSON Schema has it, in ``[minimum, maximum]``."""
    return Annotated[int, Field(ge=minimum, le=maximum), BeforeValidator(_json_integer)]


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (a pydantic JSON schema) with its ``$defs`` references replaced by their
    definitions, to embed in the OpenAPI document (no recursive models)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


class Problem(BaseModel):
    """Why a request was refused."""

    detail: str


#: Statuses every authenticated route may answer with, documented once.
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The request is refused; `detail` says why."},
    401: {"model": Problem, "description": "Missing, unknown or revoked credential."},
    403: {"model": Problem, "description": "The caller may not do this."},
    404: {"model": Problem, "description": "No such resource."},
    409: {"model": Problem, "description": "Conflicts with the current state."},
}
#: REFUSALS for a route whose own answer is not JSON (its refusals still are).
REFUSALS_AS_JSON: dict[int | str, dict[str, Any]] = {
    status: {
        "description": r["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status, r in REFUSALS.items()
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "The body is over its cap."}
}


# Credentials and cohorts


class TokenCreated(BaseModel):
    id: int
    name: str
    role: str
    #: Shown once; only its hash is kept.
    token: str


class TokenPublic(BaseModel):
    id: int
    name: str
    role: str
    revoked: bool
    created_at: datetime


class TokenRevoked(BaseModel):
    id: int
    revoked: bool


class EnrollmentTokenCreated(BaseModel):
    token: str
    cohort: str | None
    max_uses: int


class CohortPublic(BaseModel):
    name: str
    filter: dict[str, str] | None
    members: list[str]


class CohortDevices(BaseModel):
    name: str
    filter: dict[str, str] | None
    devices: list[str]


# Devices


class EnrollResult(BaseModel):
    device_id: DeviceId
    #: The device's credential, shown once.
    credential: str
    relay_id: DeviceId | None = None


class DevicePublic(BaseModel):
    """A device as the API shows it (never its credential hash)."""

    id: str
    hardware_id: str
    generation: str
    platform: str
    firmware_version: str
    onnxruntime_version: str | None
    free_flash_bytes: int
    free_ram_bytes: int
    revoked: bool
    relay_id: str | None
    enrolled_at: datetime
    last_seen: datetime | None
    last_nonce: str | None
    installed: list[InstalledModel] | None


class Completeness(BaseModel):
    """Telemetry batches received against those the sequence numbers say were sent."""

    device_id: str
    batches_received: int
    batches_expected: int
    completeness: float | None
    windows_dropped_on_device: int
    #: Stored batch records that failed the checks on read (skipped, never counted).
    skipped_rows: int = 0


class DeviceDetail(DevicePublic):
    telemetry: Completeness


class PairingEnded(BaseModel):
    device_id: str
    relay_id: None = None


class DeviceRevoked(BaseModel):
    device_id: str
    revoked: bool


class PinResult(BaseModel):
    device_id: str
    model: str
    version: str | None


class SignatureDoc(BaseModel):
    keyid: str
    #: Base64 of the Ed25519 signature.
    sig: str


class SignedAssignmentSet(BaseModel):
    """The envelope of a director-signed :class:`AssignmentSet`."""

    signatures: list[SignatureDoc]
    signed: AssignmentSet


# The check-in answer as CheckInResponse has it, with its envelope described (the format keeps it
# as a plain dict, which would document nothing); built from the format's fields so it follows them.
CheckInAnswer: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "CheckInAnswer",
    __doc__=CheckInResponse.__doc__,
    **{
        name: (SignedAssignmentSet if name == "assignment_set" else f.annotation, f)
        for name, f in CheckInResponse.model_fields.items()
    },
)


class RootEnvelope(BaseModel):
    """A version of the trusted root, as signed (``root.json``)."""

    signatures: list[SignatureDoc]
    signed: Root


# Registry


class PublishResult(BaseModel):
    sha256: str
    model: str
    version: str
    target_id: str
    length: int


class HilReportAttached(BaseModel):
    sha256: str
    target_id: str
    runs: int
    passed: bool


class ReferenceAttached(BaseModel):
    """A detached reference file kept for its bundle: how many histograms it holds."""

    sha256: str
    target_id: str
    inputs: int
    outputs: int


class BundleRef(BaseModel):
    sha256: str
    target_id: str
    length: int


class VersionPublic(BaseModel):
    version: str
    release_counter: int
    published_by: str
    published_at: datetime
    withdrawn: bool
    released_for: list[str]
    provenance: Provenance | None
    bundles: list[BundleRef]


class ModelPublic(BaseModel):
    name: str
    #: Newest first.
    versions: list[VersionPublic]


class Released(BaseModel):
    model: str
    version: str
    released_for: list[str]


class Withdrawn(BaseModel):
    model: str
    version: str
    withdrawn: bool


# Telemetry


class TelemetryAccepted(BaseModel):
    accepted: bool
    #: True when the batch's key was seen before (nothing merged).
    replay: bool
    windows: int


class Rollup(BaseModel):
    """Merged telemetry of one model version x generation x platform x event-time day."""

    model: str
    version: str
    generation: str
    platform: str
    day: str
    inference_count: int
    error_count: int
    selftest_failure_count: int
    window_count: int
    latency: LatencySketch
    outputs: dict[str, list[int]]
    inputs: dict[str, list[int]]
    feedback: dict[str, int]
    labels: dict[str, dict[str, int]]
    #: Quantile ("0.5", "0.9", "0.99") -> seconds, None without data.
    latency_quantiles_s: dict[str, float | None]


# Health


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    root_version: int


class NotReady(BaseModel):
    status: Literal["unavailable"]
    reason: str = Field(max_length=200)


# Field metrics and drift (server.metrics)


class LatencyFigures(BaseModel):
    """Latency in seconds from the merged sketches (quantiles within the sketch's accuracy)."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class OutputFigures(BaseModel):
    name: str
    #: Bin names from the manifest (class names, or edges with under/overflow).
    bins: list[str] | None
    counts: list[int]
    proportions: list[float] | None


class TallyFigure(BaseModel):
    count: int
    #: Per inference.
    rate: float | None


class AccuracyFigures(BaseModel):
    #: Share of labels that equal the prediction they correct; None without labels.
    value: float | None
    #: Labels the accuracy rests on (their prediction known).
    labels: int
    labels_without_prediction: int


class CompletenessFigures(BaseModel):
    """Telemetry batches received against those the reporting devices' sequence numbers say
    were sent."""

    batches_received: int
    batches_expected: int
    ratio: float | None


class ShadowFigures(BaseModel):
    """A candidate run in shadow beside the figures' version: the version pair's agreement
    (``agreed / compared``: the same top class, or the same output bin for regression)."""

    candidate_version: str
    sampled: int
    #: Sampled calls the devices dropped because their shadow queue was full.
    dropped: int
    compared: int
    agreed: int
    agreement: float | None
    errors: int
    error_rate: float | None
    latency_s: LatencyFigures


class Figures(BaseModel):
    """A group's field figures, or ``withheld`` saying why not (too few devices, to a viewer)."""

    withheld: str | None = None
    devices_reporting: int | None = None
    windows: int | None = None
    inferences: int | None = None
    errors: int | None = None
    error_rate: float | None = None
    selftest_failures: int | None = None
    #: Share of reporting devices that reported a self-test failure.
    selftest_failure_rate: float | None = None
    latency_s: LatencyFigures | None = None
    outputs: list[OutputFigures] | None = None
    feedback: dict[str, TallyFigure] | None = None
    accuracy: AccuracyFigures | None = None
    completeness: CompletenessFigures | None = None
    data_quality: DataQualityFigures | None = None
    shadow: list[ShadowFigures] | None = None


class DayFigures(Figures):
    day: str


class SpanPublic(BaseModel):
    model: str
    version: str
    hardware_id: str | None
    start: datetime
    end: datetime


class VersionMetrics(BaseModel):
    """A version's field figures over an event-time span, in total and per day."""

    span: SpanPublic
    min_devices_shown: int
    #: Stored rows that failed the checks and were left out.
    skipped_rows: int
    total: Figures
    days: list[DayFigures]


class DriftRow(Drift):
    """Drift of one input feature or output, over every bin (under/overflow and unseen too)."""

    name: str
    bins: list[str]
    counts: list[int]
    baseline_counts: list[int]
    #: Inputs only: missing, out-of-range and unseen values of the current side.
    data_quality: FeatureQualityCounts | None = None


class DriftFigures(BaseModel):
    withheld: str | None = None
    devices_reporting: int | None = None
    inputs: list[DriftRow] | None = None
    outputs: list[DriftRow] | None = None


class VersionDrift(BaseModel):
    """A version's drift over a span against the manifest's reference or another version."""

    span: SpanPublic
    #: ``reference`` (the manifest's reference histograms) or a version of the same model.
    against: str
    min_devices_shown: int
    psi_zero_proportion: float
    method: str
    baseline_devices_reporting: int | None
    skipped_rows: int
    drift: DriftFigures


class TelemetryErased(BaseModel):
    """What erasing a device's telemetry removed."""

    device_id: str
    windows: int
    rollups: int
    batches: int
