"""SQLModel tables of the fleet: credentials, devices and cohorts, registry, releases, telemetry.

Release state is a log (``release``) rather than one mutable row, so withdrawing a version falls
back to the previous release, and staged rollouts can later write the same log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlmodel import Field, SQLModel


class ApiToken(SQLModel, table=True):
    """An operator credential with one role; only its SHA-256 is stored."""

    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    role: str = Field(index=True)
    token_hash: str = Field(unique=True, index=True)
    created_at: datetime
    revoked: bool = False


class EnrollmentToken(SQLModel, table=True):
    """A token devices enroll with: optionally tied to a cohort, with expiry and a use limit."""

    __tablename__ = "enrollment_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, index=True)
    cohort: str | None = None
    expires_at: datetime
    max_uses: int
    uses: int = 0
    revoked: bool = False


class Cohort(SQLModel, table=True):
    """A named group of devices: static members and/or an attribute filter."""

    __tablename__ = "cohort"
    name: str = Field(primary_key=True)
    #: e.g. {"generation": "ring-gen3", "platform": "nrf52840", "firmware_min": "3.1.0"}
    filter: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime


class CohortMember(SQLModel, table=True):
    __tablename__ = "cohort_member"
    cohort: str = Field(primary_key=True, foreign_key="cohort.name")
    device_id: str = Field(primary_key=True, foreign_key="device.id")


class Device(SQLModel, table=True):
    """An enrolled device, its capabilities, credential and last contact."""

    __tablename__ = "device"
    __table_args__ = (
        # The few revoked devices, so counts over active ones are all minus these (the Fleet and
        # Model pages); a partial index, so a check-in (never revoked) writes no entry in it.
        Index(
            "ix_device_revoked",
            "id",
            postgresql_where=text("revoked"),
            sqlite_where=text("revoked"),
        ),
    )
    id: str = Field(primary_key=True)
    hardware_id: str = Field(index=True)
    generation: str
    platform: str
    firmware_version: str
    onnxruntime_version: str | None = None
    free_flash_bytes: int
    free_ram_bytes: int
    credential_hash: str = Field(unique=True, index=True)
    revoked: bool = False
    #: The phone that relays for this device (a ring), if paired.
    relay_id: str | None = Field(default=None, index=True)
    enrolled_at: datetime
    # Indexed: the Fleet page lists the devices silent longest (docs/dashboard.md, "Scale").
    last_seen: datetime | None = Field(default=None, index=True)
    last_nonce: str | None = None
    installed: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))


class Model(SQLModel, table=True):
    __tablename__ = "model"
    name: str = Field(primary_key=True)
    created_at: datetime


class ModelVersion(SQLModel, table=True):
    """One published version of a model, with lineage."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("model_name", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="model.name", index=True)
    version: str
    release_counter: int
    published_by: str
    published_at: datetime
    provenance: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    withdrawn: bool = False


class Bundle(SQLModel, table=True):
    """A verified bundle for one target: immutable, addressed by its SHA-256."""

    __tablename__ = "bundle"
    sha256: str = Field(primary_key=True)
    version_id: int = Field(foreign_key="model_version.id", index=True)
    target_id: str = Field(index=True)
    length: int
    format: str
    firmware_min: str
    firmware_below: str | None = None
    op_types: list[str] = Field(sa_column=Column(JSON))
    manifest: dict[str, Any] = Field(sa_column=Column(JSON))
    hil_report: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    #: The reference file of a format-3 manifest (from the bundle, or uploaded beside a bundle
    #: that detaches it); None for formats 1 and 2 (their manifest holds it) and until a
    #: detached one is uploaded.
    reference: bytes | None = Field(default=None, sa_column=Column(LargeBinary))


class Release(SQLModel, table=True):
    """A log entry: from ``released_at`` on, ``version_id`` is current for a model and target."""

    __tablename__ = "release"
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True)
    target_id: str = Field(index=True)
    version_id: int = Field(foreign_key="model_version.id")
    released_at: datetime
    released_by: str


class Pin(SQLModel, table=True):
    """Holds one device on one version of a model."""

    __tablename__ = "pin"
    device_id: str = Field(primary_key=True, foreign_key="device.id")
    model_name: str = Field(primary_key=True)
    version_id: int = Field(foreign_key="model_version.id")


class TelemetryBatchRecord(SQLModel, table=True):
    """One accepted telemetry upload; its key makes replays no-ops."""

    __tablename__ = "telemetry_batch"
    __table_args__ = (UniqueConstraint("device_id", "boot_epoch", "sequence"),)
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    boot_epoch: int
    sequence: int
    window_count: int
    dropped_windows: int = 0
    received_at: datetime


class TelemetryBatchCount(SQLModel, table=True):
    """A device's accepted batches in one boot epoch: how many, and the highest sequence number
    (so ``top_sequence + 1`` were sent): what completeness over many devices reads, one row per
    device and epoch instead of one per batch. Kept by :mod:`server.batch_counts`."""

    __tablename__ = "telemetry_batch_count"
    device_id: str = Field(primary_key=True)
    boot_epoch: int = Field(primary_key=True)
    #: The device's (which never changes): the Fleet page adds completeness up per hardware id
    #: from this table alone, without joining ``device`` (migration 0011).
    hardware_id: str
    received: int
    top_sequence: int


class BatchCountGeneration(SQLModel, table=True):
    """One row (id 1): bumped whenever ``telemetry_batch_count`` loses rows (a device's telemetry
    erased), so remembered completeness figures know a count changed
    (:mod:`server.contributor_cache`)."""

    __tablename__ = "telemetry_batch_count_generation"
    id: int = Field(default=1, primary_key=True)
    generation: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


#: Windows not yet folded into rollups (what the fold job claims and readers add to rollups).
UNFOLDED = text("NOT folded")


class TelemetryWindowRecord(SQLModel, table=True):
    """One accepted window of one device, as it arrived: what rollups are derived from, what
    attributes telemetry to a device and an event time (rollout arms), and what erasing a device's
    data removes. Dropped after ``telemetry_retention_days`` (its rollup stays).

    Appended by ingest with ``folded`` false; the fold job (:mod:`server.fold`) adds it into its
    rollup and sets ``folded`` in the same transaction. On PostgreSQL the table is partitioned by
    event-time day (``window_start``; primary key ``(id, window_start)``, see migration 0009).
    """

    __tablename__ = "telemetry_window"
    __table_args__ = (
        Index("ix_telemetry_window_version_start", "model", "version", "window_start"),
        Index(
            "ix_telemetry_window_unfolded",
            "model",
            "version",
            "window_start",
            postgresql_where=UNFOLDED,
            sqlite_where=UNFOLDED,
        ),
    )
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    batch_id: int = Field(foreign_key="telemetry_batch.id", index=True)
    device_id: str = Field(index=True)
    hardware_id: str
    model: str
    version: str
    bundle_sha256: str
    window_start: datetime = Field(index=True)
    window_s: int
    #: The window's aggregates (see :mod:`server.aggregate`).
    aggregate: dict[str, Any] = Field(sa_column=Column(JSON))
    #: Added into its rollup yet (by the fold job)?
    folded: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )


class TelemetryRollup(SQLModel, table=True):
    """A device's windows of one model version on one event-time day (UTC), added up.

    Kept per device, so erasing a device's data removes exactly its contribution and a figure can
    say over how many devices it was computed; fleet figures add these up.
    """

    __tablename__ = "telemetry_rollup"
    __table_args__ = (
        UniqueConstraint("device_id", "model", "version", "day"),
        Index("ix_telemetry_rollup_version_day", "model", "version", "day"),
        # Whole-day figures read who contributed from this index alone (server.metrics).
        Index(
            "ix_telemetry_rollup_version_day_devices",
            "model",
            "version",
            "day",
            "hardware_id",
            "device_id",
            "selftest_failure_count",
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    hardware_id: str
    generation: str
    platform: str
    model: str
    version: str
    day: str
    inference_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    error_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    selftest_failure_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    window_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    latency: dict[str, Any] = Field(sa_column=Column(JSON))
    outputs: dict[str, Any] = Field(sa_column=Column(JSON))
    inputs: dict[str, Any] = Field(sa_column=Column(JSON))
    feedback: dict[str, Any] = Field(sa_column=Column(JSON))
    labels: dict[str, Any] = Field(sa_column=Column(JSON))
    #: Data-quality tallies and shadow counts (server.aggregate); NULL in rows written before
    #: migration 0007, read as empty.
    quality: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class FleetRollup(SQLModel, table=True):
    """The day rollups of every device on one hardware id, for one model version and event-time
    day, added up: what whole-day fleet figures read instead of one row per device.

    ``device_count`` and ``selftest_failed_devices`` count the devices whose (valid) rollups are
    in it; ``skipped_rows`` counts the devices' rows that fail their checks and are left out
    (readers fall back to the per-device rows for such a key). Kept by
    :mod:`server.fleet_rollup`.
    """

    __tablename__ = "telemetry_fleet_rollup"
    __table_args__ = (UniqueConstraint("model", "version", "day", "hardware_id"),)
    id: int | None = Field(default=None, primary_key=True)
    model: str
    version: str
    day: str
    hardware_id: str
    device_count: int = 0
    selftest_failed_devices: int = 0
    skipped_rows: int = 0
    inference_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    error_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    selftest_failure_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    window_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    latency: dict[str, Any] = Field(sa_column=Column(JSON))
    outputs: dict[str, Any] = Field(sa_column=Column(JSON))
    inputs: dict[str, Any] = Field(sa_column=Column(JSON))
    feedback: dict[str, Any] = Field(sa_column=Column(JSON))
    labels: dict[str, Any] = Field(sa_column=Column(JSON))
    #: Data-quality tallies and shadow counts, as in :class:`TelemetryRollup`; NULL reads as
    #: empty. (The aggregate columns repeat TelemetryRollup's: a SQLAlchemy ``Column`` belongs to
    #: one table, so SQLModel cannot share them through a base class.)
    quality: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class Rollout(SQLModel, table=True):
    """A staged rollout of one model version to the devices a selector picks.

    ``stages`` and ``gates`` are the plan as created (see :mod:`server.rollouts`); ``previous`` maps
    each hardware id to the version id its control arm stays on (what was released there when
    the rollout started).
    """

    __tablename__ = "rollout"
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True)
    version_id: int = Field(foreign_key="model_version.id")
    selector: dict[str, Any] = Field(sa_column=Column(JSON))
    stages: list[dict[str, Any]] = Field(sa_column=Column(JSON))
    gates: dict[str, Any] = Field(sa_column=Column(JSON))
    previous: dict[str, Any] = Field(sa_column=Column(JSON))
    on_failure: str
    state: str = Field(index=True)
    stage: int = 0
    created_by: str
    created_at: datetime
    started_at: datetime | None = None
    stage_started_at: datetime | None = None
    #: When the last stage short of 100% ended: the control arm's data is taken up to here.
    control_until: datetime | None = None
    #: A shadow rollout: ``{"sample_fraction": f}`` (docs/rollouts.md); None for a normal one.
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    finished_at: datetime | None = None


class RolloutDecision(SQLModel, table=True):
    """One evaluation or action on a rollout: what was decided, by whom, on which figures."""

    __tablename__ = "rollout_decision"
    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    at: datetime
    #: ``evaluator`` for the server's own evaluator, else ``operator:NAME``.
    actor: str
    action: str
    stage: int
    state_before: str
    state_after: str
    reason: str
    figures: dict[str, Any] = Field(sa_column=Column(JSON))


class JobLock(SQLModel, table=True):
    """A lease that lets one server process at a time run a periodic job (the rollout
    evaluator): taken by an atomic update when free or expired, renewed while held."""

    __tablename__ = "job_lock"
    name: str = Field(primary_key=True)
    holder: str
    expires_at: datetime


class Confirmation(SQLModel, table=True):
    """The server's word that a version is good for the devices of one hardware id (those a
    rollout selects, when ``rollout_id`` is set): devices may raise their anti-rollback floor to
    its release counter, and no assignment may take them below it (see docs/rollback.md)."""

    __tablename__ = "confirmation"
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True)
    hardware_id: str
    version_id: int = Field(foreign_key="model_version.id")
    release_counter: int
    rollout_id: int | None = Field(default=None, foreign_key="rollout.id")
    confirmed_at: datetime
    confirmed_by: str


class Webhook(SQLModel, table=True):
    """A subscription: where to POST which events, the secret that signs them, and the
    thresholds of its threshold events (see docs/webhooks.md). Removed ones stay (inactive), so
    the delivery log keeps naming them."""

    __tablename__ = "webhook"
    id: int | None = Field(default=None, primary_key=True)
    url: str
    events: list[str] = Field(sa_column=Column(JSON))
    #: Only this model's events, when set.
    model: str | None = None
    #: Signs deliveries, so it is kept as given (it cannot be hashed).
    secret: str
    thresholds: dict[str, Any] = Field(sa_column=Column(JSON))
    created_by: str
    created_at: datetime
    active: bool = Field(default=True, index=True)
    removed_at: datetime | None = None


class Outbound(SQLModel, table=True):
    """One event on its way to one sink (a webhook subscription, or MLflow): written in the
    transaction of the change it reports, delivered at least once by the delivery job."""

    __tablename__ = "outbound"
    __table_args__ = (Index("ix_outbound_state_next", "state", "next_attempt_at"),)
    id: int | None = Field(default=None, primary_key=True)
    #: ``webhook`` or ``mlflow``.
    sink: str
    webhook_id: int | None = Field(default=None, foreign_key="webhook.id", index=True)
    kind: str
    event_id: str
    #: The exact bytes a webhook signs and sends (JSON); for MLflow, what to tag.
    payload: str = Field(sa_column=Column(Text, nullable=False))
    delivery_id: str = Field(unique=True)
    attempts: int = 0
    #: ``pending``, ``delivered``, ``failed``, ``cancelled`` or ``skipped``.
    state: str = "pending"
    created_at: datetime
    next_attempt_at: datetime
    last_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None


class TriggerState(SQLModel, table=True):
    """Whether one threshold condition held at its last check, so an event fires when it starts
    to hold and again only after it cleared (``schedule.due`` keeps its last firing here)."""

    __tablename__ = "trigger_state"
    __table_args__ = (UniqueConstraint("webhook_id", "model", "version", "condition", "subject"),)
    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(foreign_key="webhook.id", index=True)
    model: str
    version: str
    condition: str
    subject: str
    holding: bool = False
    value: float | None = None
    changed_at: datetime
    checked_at: datetime


class DeviceEvent(SQLModel, table=True):
    """A change in what a device reported, or in its enrolment and pairing (see
    :mod:`server.device_events`): recorded when it happens, not at every check-in.

    ``kind`` is one of :data:`server.device_events.KINDS`; ``model``, ``version``,
    ``bundle_sha256`` and ``outcome`` are set where the kind has them (an install's outcome:
    ``ok``, ``self-test-failed``, ``verify-failed``, ``download-failed``), the rest is in
    ``details``.
    """

    __tablename__ = "device_event"
    __table_args__ = (
        Index("ix_device_event_device_at", "device_id", "at", "id"),
        Index("ix_device_event_kind_at", "kind", "at", "outcome"),
    )
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    device_id: str
    at: datetime
    kind: str
    model: str | None = None
    version: str | None = None
    bundle_sha256: str | None = None
    outcome: str | None = None
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class DeviceState(SQLModel, table=True):
    """What a device last reported, as the event log last recorded it: check-in compares the
    reported state's hash with ``state_hash`` and records events only when they differ."""

    __tablename__ = "device_state"
    device_id: str = Field(primary_key=True)
    state_hash: str
    firmware_version: str
    installed: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    recorded_at: datetime


class DeviceInstalled(SQLModel, table=True):
    """One model a device reported running, as the event log last recorded it (written with
    :class:`DeviceState`, so on change only): what the fleet views count devices by version
    and hardware id from, without reading every device's JSON."""

    __tablename__ = "device_installed"
    __table_args__ = (
        # With the install outcome: the Fleet page's devices per version, hardware id and outcome,
        # and the Model page's per version and hardware id, are index-only scans (written on
        # change only, so its pages stay all-visible).
        Index(
            "ix_device_installed_version_outcome", "model", "version", "hardware_id", "last_install"
        ),
    )
    device_id: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    hardware_id: str
    version: str | None = None
    bundle_sha256: str | None = None
    last_install: str | None = None
