"""Every body that crosses between server and agent, or agent and device, defined once.

The server and the agent never import each other; they meet here. Signed ones (the director's
assignment set) travel in an :class:`~firmware_bundles.signing.Envelope`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from firmware_bundles.anti_rollback import ReleaseCounters
from firmware_bundles.errors import (
    ExpiredError,
    ReplayError,
    RollbackError,
    WrongDeviceError,
    WrongHardwareError,
)
from firmware_bundles.manifest import SEMVER_PATTERN, Sha256, check_semver
from firmware_bundles.root import Root
from firmware_bundles.schema import Document
from firmware_bundles.signing import Envelope, SigningKey
from firmware_bundles.telemetry import (
    BIN_KEY_MAX,
    BIN_KEY_MIN,
    MAX_COUNT,
    MAX_LATENCY_S,
    MIN_RELATIVE_ACCURACY,
    bin_key_bounds,
)

if TYPE_CHECKING:  # the catalogue imports the manifest, as this module does
    from firmware_bundles.catalogue import DeviceTarget

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
#: The one rule for ids, as a regular expression (match it whole: ``re.fullmatch``).
DEVICE_ID_PATTERN = _ID
#: A device id, wherever one enters (enrollment, pairing, a URL path): the one rule for ids.
DeviceId = Annotated[str, StringConstraints(pattern=_ID)]
_NONCE = r"^[0-9a-f]{32,128}$"


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (UTC)")
    return v.astimezone(UTC)


class CapabilityReport(Document):
    """What a device is and can hold, sent at enrollment and when it changes."""

    hardware_id: str = Field(pattern=_ID)
    generation: str
    platform: str
    firmware_version: str = Field(pattern=SEMVER_PATTERN)
    onnxruntime_version: str | None = None
    free_flash_bytes: int = Field(ge=0)
    free_ram_bytes: int = Field(ge=0)
    links: list[Literal["ble", "serial", "https"]] = Field(default_factory=list)

    @field_validator("firmware_version")
    @classmethod
    def _fw(cls, v: str) -> str:
        return check_semver(v)

    @classmethod
    def of_target(
        cls,
        target: DeviceTarget,
        free_bytes: tuple[int, int],
        firmware_version: str,
        links: list[str] | None = None,
        onnxruntime_version: str | None = None,
    ) -> CapabilityReport:
        """A device of catalogue entry ``target`` (its hardware id, generation, platform and, if
        ``links`` is None, its links) with ``free_bytes``: (flash, RAM)."""
        return cls.model_validate(
            {
                "hardware_id": target.hardware_id,
                "generation": target.generation,
                "platform": target.platform,
                "firmware_version": firmware_version,
                "onnxruntime_version": onnxruntime_version,
                "free_flash_bytes": free_bytes[0],
                "free_ram_bytes": free_bytes[1],
                "links": list(target.links) if links is None else links,
            }
        )


#: ``standby``: the previous active bundle, kept intact as the fallback after an activation.
SlotStatus = Literal["empty", "installing", "self-test", "active", "standby", "failed", "reverted"]


class InstalledModel(Document):
    """One model's state on a device."""

    model: str
    version: str | None = None
    bundle_sha256: Sha256 | None = None
    release_counter: int = Field(default=0, ge=0)
    active_slot: Literal["a", "b"] | None = None
    slots: dict[Literal["a", "b"], SlotStatus] = Field(default_factory=dict)
    last_install: Literal["ok", "self-test-failed", "verify-failed", "download-failed"] | None = (
        None
    )
    last_error: str | None = None


class CheckInRequest(Document):
    """A device's periodic report of its state, asking what it should run."""

    device_id: str = Field(pattern=_ID)
    nonce: str = Field(pattern=_NONCE)
    firmware_version: str
    installed: list[InstalledModel] = Field(default_factory=list)
    capabilities: CapabilityReport | None = None


class Assignment(Document):
    """The director's word that one device should run one bundle now (one model's entry of a
    verified :class:`AssignmentSet`, with the set's addressing, nonce and times filled in).

    Not signed on its own: the director signs one :class:`AssignmentSet` per check-in.
    """

    type: Literal["assignment"] = Field(default="assignment", alias="_type")
    device_id: str = Field(pattern=_ID)
    hardware_id: str = Field(pattern=_ID)
    model: str
    version: str
    bundle_sha256: Sha256
    bundle_length: int = Field(gt=0)
    release_counter: int = Field(ge=0)
    download_url: str
    confirmed_release_counter: int | None = Field(default=None, ge=0)
    shadow: ShadowBundle | None = None
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(pattern=_NONCE)

    _check_times = field_validator("issued_at", "expires_at")(_utc)

    @model_validator(mode="after")
    def _order(self) -> Assignment:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class ShadowBundle(Document):
    """A candidate bundle a device runs in its shadow slot on a sampled share of the inputs
    after the active model answered; its answers never reach the caller.

    Never activated from here, so it is held to no release counter floor; the bundle is
    verified as any other (release signatures, hash, length, hardware id).
    """

    version: str
    bundle_sha256: Sha256
    bundle_length: int = Field(gt=0)
    release_counter: int = Field(ge=0)
    download_url: str
    #: Share of the active model's successful calls the candidate also runs on.
    sample_fraction: float = Field(gt=0, le=1, allow_inf_nan=False)


class AssignedBundle(Document):
    """One model's entry in an :class:`AssignmentSet`.

    ``confirmed_release_counter``: the release counter of the newest version the server
    confirmed for this device (``docs/rollback.md``); the device's floor for the model rises
    to it once it has installed that far. Left out of the bytes when None (nothing confirmed),
    so sets without it read as before.
    """

    model: str = Field(min_length=1)
    version: str
    bundle_sha256: Sha256
    bundle_length: int = Field(gt=0)
    release_counter: int = Field(ge=0)
    download_url: str
    confirmed_release_counter: int | None = Field(
        default=None, ge=0, exclude_if=lambda v: v is None
    )
    #: A candidate to run in shadow beside this entry's bundle (docs/rollouts.md, "Shadow
    #: runs"); left out of the bytes when None, so sets without one read as before.
    shadow: ShadowBundle | None = Field(default=None, exclude_if=lambda v: v is None)


#: The longest a signed answer may tell a device to wait before its next check-in (a day): even
#: the director's own word cannot keep a device from hearing of a fix for longer.
MAX_NEXT_CHECK_IN_S = 24 * 3600


class AssignmentSet(Document):
    """Everything the director tells one device at one check-in, signed once.

    As Uptane's director signs one targets document per vehicle: one signature per check-in
    (rather than one per model) and a consistent view, so entries from different check-ins
    cannot be mixed. It carries the device's nonce; an empty ``bundles`` list is a valid answer.
    What the device acts on besides the bundles (why a model is withheld, when to check in
    next) is in here too, so nobody on the path can change it (a freeze attack).
    """

    type: Literal["assignments"] = Field(default="assignments", alias="_type")
    device_id: str = Field(pattern=_ID)
    hardware_id: str = Field(pattern=_ID)
    nonce: str = Field(pattern=_NONCE)
    issued_at: datetime
    expires_at: datetime
    bundles: list[AssignedBundle] = Field(default_factory=list)
    #: Models the server has for this device but does not assign, and why.
    withheld: dict[str, str] = Field(default_factory=dict)
    next_check_in_s: int = Field(default=3600, ge=1, le=MAX_NEXT_CHECK_IN_S)

    _check_times = field_validator("issued_at", "expires_at")(_utc)

    @model_validator(mode="after")
    def _check(self) -> AssignmentSet:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        models = [b.model for b in self.bundles]
        if len(set(models)) != len(models):
            raise ValueError("each model may appear once")
        return self

    def sign(self, key: SigningKey) -> Envelope:
        """An envelope of this set signed by the director ``key``."""
        envelope = Envelope(signed=self.to_dict())
        envelope.sign(key)
        return envelope

    def assignments(self) -> list[Assignment]:
        """One :class:`Assignment` per entry, carrying the set's addressing, nonce and times."""
        common = {
            "device_id": self.device_id,
            "hardware_id": self.hardware_id,
            "nonce": self.nonce,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }
        return [Assignment(**common, **b.model_dump()) for b in self.bundles]


@dataclass(frozen=True)
class RefusedAssignment:
    """One entry of a verified set that the device must not act on, and why."""

    assignment: Assignment
    error: RollbackError


@dataclass(frozen=True)
class VerifiedAssignments:
    """A director-signed :class:`AssignmentSet` a device may act on, entry by entry.

    Attributes:
        assignments: The entries to bring into effect, in the set's order.
        refused: Entries below the device's release counter floor for their model; the other
            models still update.
        withheld: Models the server has for this device but does not assign, and why.
        next_check_in_s: When the director asks to hear from the device again.
        counters: The device's counters after the set's confirmed release counters were heard
            (floors raised first, then every entry held to them); persist them if changed.
    """

    assignments: list[Assignment]
    refused: list[RefusedAssignment]
    withheld: dict[str, str]
    next_check_in_s: int
    counters: ReleaseCounters


def verify_assignments(
    data: bytes,
    root: Root,
    *,
    device_id: str,
    hardware_id: str,
    nonce: str,
    now: datetime,
    min_release_counters: ReleaseCounters | Mapping[str, int] | None = None,
) -> VerifiedAssignments:
    """Check a director-signed :class:`AssignmentSet` as a device must before acting on it.

    The set-level checks (signature, device, hardware, nonce, expiry) refuse the whole set.
    Then each entry's ``confirmed_release_counter`` is heard (which may raise its model's floor,
    never lower it: ``docs/rollback.md``), and an entry below its model's floor is refused alone.

    Args:
        data: The check-in answer's bytes as received (the set's envelope).
        root: The device's trusted root.
        device_id: This device (or, for a relay, the device the set is for).
        hardware_id: Its hardware id (catalogue target id).
        nonce: The nonce sent with the check-in.
        now: The current time.
        min_release_counters: The device's :class:`ReleaseCounters`, or (old callers) just its
            floor per model.

    Returns:
        The entries to act on, the refused ones with their :class:`RollbackError`, and the rest
        of what the set tells the device.

    Raises:
        SchemaError: If malformed.
        ThresholdError: If the director's signature threshold is not met.
        WrongDeviceError: If addressed to another device.
        WrongHardwareError: If for another hardware id.
        ReplayError: If it carries another nonce than the one sent.
        ExpiredError: If expired at ``now``.
    """
    envelope = Envelope.from_bytes(data, "assignment set")
    root.verify(envelope, "director")
    signed = AssignmentSet.from_dict(envelope.signed)
    if signed.device_id != device_id:
        raise WrongDeviceError(
            f"assignment set is addressed to device {signed.device_id}, not {device_id}",
            expected=device_id,
            found=signed.device_id,
        )
    if signed.hardware_id != hardware_id:
        raise WrongHardwareError(
            f"assignment set is for hardware {signed.hardware_id}, this device is {hardware_id}",
            expected=hardware_id,
            found=signed.hardware_id,
        )
    if signed.nonce != nonce:
        raise ReplayError(
            "assignment set nonce differs from the one sent (replay?)",
            expected=nonce,
            found=signed.nonce,
        )
    if now >= signed.expires_at:
        raise ExpiredError(f"assignment set expired at {signed.expires_at.isoformat()}")
    counters = min_release_counters
    if not isinstance(counters, ReleaseCounters):
        counters = ReleaseCounters.from_floors(counters or {})
    entries = signed.assignments()
    for entry in entries:
        if entry.confirmed_release_counter is not None:
            counters = counters.hear_confirmed(entry.model, entry.confirmed_release_counter)
    accepted, refused = [], []
    for assignment in entries:
        floor = counters.floor(assignment.model)
        if assignment.release_counter >= floor:
            accepted.append(assignment)
            continue
        error = RollbackError(
            f"release counter {assignment.release_counter} is below {floor}, the floor for"
            f" {assignment.model} (the last release confirmed for this device and run on it)",
            model=assignment.model,
            floor=floor,
            offered=assignment.release_counter,
        )
        refused.append(RefusedAssignment(assignment, error))
    return VerifiedAssignments(
        accepted, refused, dict(signed.withheld), signed.next_check_in_s, counters
    )


class EnvelopeSignature(Document):
    """One signature of an envelope: the key id and the base64 Ed25519 signature."""

    keyid: str
    sig: str


class CheckInResponse(Document):
    """The server's answer to a check-in: the director-signed envelope of one
    :class:`AssignmentSet`, nothing outside it.

    This class documents the wire shape (the route's schema); a device does not parse the answer
    with it but hands the bytes it received to :func:`verify_assignments`.
    """

    signed: AssignmentSet
    signatures: list[EnvelopeSignature]


#: A count that crosses the wire: a non-negative integer (strictly: not a bool, float or numeric
#: string) that fits the signed 32-bit counters firmware keeps.
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
#: A latency sketch's bucket key. A JSON object key, so a decimal string on the wire (an integer
#: in CBOR); bounded by :data:`~firmware_bundles.telemetry.BIN_KEY_MIN`..``BIN_KEY_MAX``, the keys
#: a latency up to ``MAX_LATENCY_S`` can have at the finest accepted accuracy, so ``gamma ** key``
#: stays a finite float (each sketch also checks its keys against its own accuracy).
SketchBinKey = Annotated[int, Field(ge=BIN_KEY_MIN, le=BIN_KEY_MAX)]
#: Latency in seconds, as the sketch clamps it.
LatencySeconds = Annotated[float, Field(ge=0, le=MAX_LATENCY_S, allow_inf_nan=False)]
#: A feedback kind, label or predicted class: 1-64 letters, digits or ``_.:-``.
TALLY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
TallyName = Annotated[str, Field(pattern=TALLY_NAME_PATTERN)]


class LatencySketch(Document):
    """A mergeable latency sketch in DDSketch's log-bucket form.

    Values (seconds) map to bucket ``ceil(log(v) / log(gamma))`` with
    ``gamma = (1 + a) / (1 - a)`` for relative accuracy ``a``. Merging adds counts per bucket, so
    merges are associative and commutative and any order gives the same sketch. ``count`` is
    ``zero_count`` plus the buckets' counts; ``min`` and ``max`` are set exactly when it is not 0.
    """

    relative_accuracy: float = Field(ge=MIN_RELATIVE_ACCURACY, lt=1, allow_inf_nan=False)
    bins: dict[SketchBinKey, Count] = Field(default_factory=dict)
    zero_count: Count = 0
    count: Count = 0
    sum: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    min: LatencySeconds | None = None
    max: LatencySeconds | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LatencySketch:
        bins = self.bins
        if bins:
            low, high = bin_key_bounds(self.relative_accuracy)
            if min(bins) < low or max(bins) > high:
                raise ValueError(
                    f"bin keys must lie in {low}..{high} at relative accuracy"
                    f" {self.relative_accuracy} (latencies up to {MAX_LATENCY_S:g} s)"
                )
        if self.count != self.zero_count + sum(bins.values()):
            raise ValueError("count must equal zero_count plus the bins' counts")
        if (self.min is None or self.max is None) != (self.count == 0):
            raise ValueError("min and max are set exactly when count is not 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        if self.sum > self.count * MAX_LATENCY_S:
            raise ValueError(f"sum exceeds count times {MAX_LATENCY_S:g} s")
        return self


class HistogramCounts(Document):
    """Counts on a manifest histogram's bins (same layout: under, bins, over or unseen)."""

    name: str = Field(min_length=1, max_length=256)
    counts: list[Count]


def _unique_names(histograms: list[HistogramCounts], field: str) -> None:
    if len(histograms) > 1 and len({h.name for h in histograms}) != len(histograms):
        raise ValueError(f"{field}: each histogram name may appear once")


#: What a window counts about the quality of its inputs (docs/telemetry.md, "Data quality").
QualityKind = Literal["missing", "refused"]


class DataQuality(Document):
    """Input problems one window saw, beside the histograms (which hold values outside the
    training range in their under/overflow bins and unseen categories in their last bin).

    Attributes:
        missing: Per input histogram name, values that were NaN or None (counted in no bin).
        refused: Per input name (``unknown`` for a call that named none of the model's inputs),
            calls the schema check refused: wrong shape, dtype or feature count, or a missing
            or unknown input. Each is also an error in ``error_count``.
    """

    missing: dict[Annotated[str, Field(min_length=1, max_length=256)], Count] = Field(
        default_factory=dict
    )
    refused: dict[Annotated[str, Field(min_length=1, max_length=256)], Count] = Field(
        default_factory=dict
    )


class ShadowCounts(Document):
    """How a candidate in shadow did beside the window's (active) version.

    ``sampled``: calls picked for the candidate; ``dropped``: of those, the ones the device
    let go because its shadow queue was full; ``compared``: the candidate ran and its answer
    was compared; ``errors``: the candidate failed. ``sampled = dropped + compared + errors``
    once the queue drained. ``agreed``: comparisons with the same top class (classification)
    or the same output bin (regression); ``latency``: the candidate's, one value per
    comparison.
    """

    version: str
    bundle_sha256: Sha256
    sampled: Count = 0
    dropped: Count = 0
    compared: Count = 0
    agreed: Count = 0
    errors: Count = 0
    latency: LatencySketch

    @model_validator(mode="after")
    def _consistent(self) -> ShadowCounts:
        if self.agreed > self.compared:
            raise ValueError("agreed must not exceed compared")
        if self.dropped + self.compared + self.errors > self.sampled:
            raise ValueError("dropped + compared + errors must not exceed sampled")
        if self.latency.count != self.compared:
            raise ValueError("the latency sketch holds one value per comparison")
        return self


class TelemetryWindow(Document):
    """Aggregates of one model version on one device over one event-time window.

    Build one with :class:`firmware_bundles.window_builder.TelemetryWindowBuilder`; check it
    against its bundle's manifest with :class:`firmware_bundles.window_builder.TelemetryLayout`.
    """

    device_id: str = Field(pattern=_ID)
    model: str
    version: str
    bundle_sha256: Sha256
    window_start: datetime
    window_s: int = Field(gt=0, le=86400)
    inference_count: Count
    error_count: Count = 0
    selftest_failure_count: Count = 0
    latency: LatencySketch
    outputs: list[HistogramCounts] = Field(default_factory=list)
    inputs: list[HistogramCounts] = Field(default_factory=list)
    feedback: dict[TallyName, Count] = Field(default_factory=dict)
    #: Per predicted class (or ``unknown``), per true label, a count.
    labels: dict[TallyName, dict[TallyName, Count]] = Field(default_factory=dict)
    #: Left out when empty, so windows without input problems read as before.
    quality: DataQuality = Field(
        default_factory=DataQuality, exclude_if=lambda v: not (v.missing or v.refused)
    )
    #: One entry per candidate run in shadow beside this version; left out when empty.
    shadow: list[ShadowCounts] = Field(default_factory=list, exclude_if=lambda v: not v)

    _check_start = field_validator("window_start")(_utc)

    @model_validator(mode="after")
    def _names(self) -> TelemetryWindow:
        _unique_names(self.outputs, "outputs")
        _unique_names(self.inputs, "inputs")
        versions = [s.bundle_sha256 for s in self.shadow]
        if len(set(versions)) != len(versions):
            raise ValueError("shadow: each candidate bundle may appear once")
        if self.bundle_sha256 in versions:
            raise ValueError("shadow: a version cannot shadow itself")
        return self


class TelemetryBatch(Document):
    """One upload: windows plus the idempotency key that makes replays no-ops."""

    device_id: str = Field(pattern=_ID)
    #: Both fit a signed 32-bit integer: firmware keeps them as counters, the server as INTEGER.
    boot_epoch: int = Field(ge=0, le=2**31 - 1)
    sequence: int = Field(ge=0, le=2**31 - 1)
    windows: list[TelemetryWindow]
    dropped_windows: Count = 0

    @model_validator(mode="after")
    def _same_device(self) -> TelemetryBatch:
        device_id = self.device_id
        for w in self.windows:
            if w.device_id != device_id:
                raise ValueError("every window must belong to the batch's device")
        return self

    @classmethod
    def from_bytes(cls, data: bytes) -> TelemetryBatch:
        """Parse and validate a batch in one pass (:meth:`Document.from_json`: every float in a
        batch is a latency field that refuses NaN and infinities itself).

        Raises:
            SchemaError: If the bytes are not JSON or do not match the schema.
        """
        return cls.from_json(data)

    @property
    def idempotency_key(self) -> tuple[str, int, int]:
        return (self.device_id, self.boot_epoch, self.sequence)
