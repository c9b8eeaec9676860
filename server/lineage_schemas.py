"""What the lineage route answers: a model version from its training data to the field (one
public model per object, so OpenAPI types every field)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from firmware_bundles.manifest import Calibration, Provenance
from firmware_bundles.rig_report import HilCheck
from server.schemas import Figures, SpanPublic


class QuantisationPublic(BaseModel):
    """The variant the converter chose for a target, and how it was made from the float
    model."""

    scheme: str
    per_channel: bool
    quantised_ops: int
    notes: str
    calibration: Calibration | None


class HilRunPublic(BaseModel):
    """One run of the bundle on one rig device."""

    spec: str
    hardware_id: str
    device_id: str
    firmware_version: str
    passed: bool
    checks: list[HilCheck]


class HilVerdict(BaseModel):
    """The rig report attached to a bundle: its verdict for this bundle on its target, and
    whether its signature still verifies against the server's current root."""

    passed: bool
    signature_valid: bool
    #: Why the signature no longer verifies (a rotated ``hil`` key), or None.
    problem: str | None
    started_at: datetime
    finished_at: datetime
    faults: list[str]
    runs: list[HilRunPublic]


class TargetLineage(BaseModel):
    """One hardware id: its bundle, the converter's choice for it and how it scored, the rig's
    verdict, and when it was released there."""

    hardware_id: str
    bundle_sha256: str
    bundle_bytes: int
    format: str
    precision: str
    quantisation: QuantisationPublic
    #: As the converter measured them on held-out data (e.g. ``accuracy``, ``float_accuracy``,
    #: ``model_bytes``, ``float_model_bytes``).
    metrics: dict[str, float]
    ram_estimate_bytes: int
    op_types: list[str]
    firmware_min: str
    firmware_below: str | None
    hil: HilVerdict | None
    released_at: list[datetime]


class ReleasePublic(BaseModel):
    hardware_id: str
    released_at: datetime
    released_by: str


class ConfirmationPublic(BaseModel):
    hardware_id: str
    release_counter: int
    rollout_id: int | None
    confirmed_at: datetime
    confirmed_by: str


class RolloutSummary(BaseModel):
    """A rollout of the version: its state, stage and dates, and its last decision."""

    id: int
    state: str
    #: 1-based current stage, and its share of the selected devices.
    stage: int
    percent: float
    hardware_ids: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    decisions: int
    last_decision_at: datetime | None
    last_action: str | None
    last_reason: str | None


class DevicesOnDay(BaseModel):
    """Devices that uploaded telemetry of the version for an event-time day (UTC)."""

    day: str
    devices: int
    inferences: int


class FieldSummary(BaseModel):
    """The version's field figures over ``span`` (as ``GET .../metrics`` gives them)."""

    span: SpanPublic
    min_devices_shown: int
    skipped_rows: int
    total: Figures


class MlflowLinks(BaseModel):
    """Where the version's MLflow origin opens in MLflow's UI (from ``provenance.mlflow``).

    A link is None when its URI is no web address (``sqlite:``, ``databricks``, a path) or the
    provenance lacks what it needs: no ``run_id`` for the run, no registered name and version
    (a ``runs:/`` source) for the model version.
    """

    #: The training run: ``{tracking}/#/experiments/{experiment_id}/runs/{run_id}``, or, with
    #: no experiment id recorded, ``{tracking}/#/runs/{run_id}`` (MLflow's UI finds the run).
    run: str | None
    #: ``{registry}/#/models/{model_name}/versions/{model_version}``.
    model_version: str | None
    #: ``{registry}/#/models/{model_name}``.
    registered_model: str | None


class Lineage(BaseModel):
    """A model version from its training source to the devices running it."""

    model: str
    version: str
    release_counter: int
    task: str | None
    published_by: str
    published_at: datetime
    withdrawn: bool
    #: Training source and data hashes, tool versions, builder (the manifest's provenance).
    provenance: Provenance | None
    #: MLflow UI links of ``provenance.mlflow`` (None when the version did not come from MLflow).
    mlflow: MlflowLinks | None = None
    targets: list[TargetLineage]
    releases: list[ReleasePublic]
    confirmations: list[ConfirmationPublic]
    rollouts: list[RolloutSummary]
    devices_per_day: list[DevicesOnDay]
    field: FieldSummary
