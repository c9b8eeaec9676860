"""Secondary verification: what a ring or board checks before it activates a bundle.

In Uptane's terms the ring is a Secondary: the phone (Primary) verified everything, and the
ring checks at least the director's signature over the assignment, its own device and hardware
ids, its nonce, the release counter against its floor (which rises only to a release the server
confirmed and the ring ran: ``docs/rollback.md``), and the bundle's hash and length. The
emulated device also checks the archive's file hashes, the manifest against the assignment, and
that the bundle fits it, as ``docs/device-protocol.md`` asks of firmware.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from device_agent.link.model_group import ModelRc
from firmware_bundles import (
    ArchiveError,
    BundleContents,
    BundleError,
    DeviceTarget,
    ExpiredError,
    ReplayError,
    SchemaError,
    SignatureError,
    WrongDeviceError,
    WrongHardwareError,
    open_bundle,
)
from firmware_bundles.anti_rollback import ReleaseCounters
from firmware_bundles.messages import Assignment, VerifiedAssignments, verify_assignments
from firmware_bundles.root import Root
from hil.errors import Refusal
from hil.micro_runtime import MicroRuntime, load_runtime
from hil.tflm_runtime import TflmRuntime


@dataclass(frozen=True)
class Verified:
    """An assignment and the staged bundle it names, checked and loaded."""

    assignment: Assignment
    contents: BundleContents
    runtime: MicroRuntime | TflmRuntime
    #: The device's counters after the set's confirmations were heard, to persist.
    counters: ReleaseCounters


@dataclass(frozen=True)
class DeviceFacts:
    """What the device knows about itself when it verifies."""

    device_id: str
    target: DeviceTarget
    firmware_version: str
    nonce: str | None
    counters: ReleaseCounters


def verify_activation(
    envelope: bytes, staged: bytes, root: Root, device: DeviceFacts, now: datetime
) -> Verified:
    """Check an assignment set envelope and the staged bundle bytes, in the documented order.

    ``staged`` is a completed upload, or the standby slot's bytes when going back to it. The set
    may assign several models; the entry whose SHA-256 is the staged bundle's applies.
    An entry below its model's release counter floor refuses that entry only, so the set still
    activates a bundle another entry names.

    Raises:
        Refusal: With the model group's rc and a reason naming the failed check.
    """
    verified = _check_assignments(envelope, root, device, now)
    digest = hashlib.sha256(staged).hexdigest()
    for refused in verified.refused:
        if refused.assignment.bundle_sha256 == digest:
            raise Refusal(ModelRc.ROLLBACK, str(refused.error))
    assignments = verified.assignments
    assignment = next((a for a in assignments if a.bundle_sha256 == digest), None)
    if assignment is None:
        named = ", ".join(f"{a.model} {a.bundle_sha256[:16]}..." for a in assignments) or "nothing"
        raise Refusal(
            ModelRc.HASH_MISMATCH,
            f"staged bundle sha256 {digest[:16]}... is not assigned (the set names {named})",
        )
    if len(staged) != assignment.bundle_length:
        raise Refusal(
            ModelRc.HASH_MISMATCH,
            f"staged bundle is {len(staged)} bytes, assignment says {assignment.bundle_length}",
        )
    try:
        contents = open_bundle(staged)
    except (ArchiveError, SchemaError) as exc:
        raise Refusal(ModelRc.BUNDLE_INVALID, f"bundle is invalid: {exc}") from exc
    manifest = contents.manifest
    theirs = (manifest.name, manifest.version, manifest.release_counter)
    ours = (assignment.model, assignment.version, assignment.release_counter)
    if theirs != ours:
        raise Refusal(
            ModelRc.BUNDLE_INVALID,
            f"manifest is {theirs[0]} {theirs[1]} counter {theirs[2]}, assignment names"
            f" {ours[0]} {ours[1]} counter {ours[2]}",
        )
    _check_fit(contents, device)
    model = bytes(contents.files[manifest.runtime.model_file])
    runtime = load_runtime(manifest, model, device.target.ram_arena_bytes)
    if runtime.arena_bytes > device.target.ram_arena_bytes:
        raise Refusal(
            ModelRc.DOES_NOT_FIT,
            f"{runtime.name} arena is {runtime.arena_bytes} bytes, RAM budget is"
            f" {device.target.ram_arena_bytes}",
        )
    return Verified(assignment, contents, runtime, verified.counters)


def _check_assignments(
    envelope: bytes, root: Root, device: DeviceFacts, now: datetime
) -> VerifiedAssignments:
    if device.nonce is None:
        raise Refusal(ModelRc.NONCE, "no nonce issued since boot; read identity first")
    try:
        return verify_assignments(
            envelope,
            root,
            device_id=device.device_id,
            hardware_id=device.target.hardware_id,
            nonce=device.nonce,
            now=now,
            min_release_counters=device.counters,
        )
    except BundleError as exc:
        raise Refusal(_rc(exc), str(exc)) from exc


def _rc(exc: BundleError) -> ModelRc:
    """The model group's rc for a refused assignment set, by the error's type."""
    codes: tuple[tuple[type[BundleError], ModelRc], ...] = (
        (SignatureError, ModelRc.SIGNATURE),
        (ExpiredError, ModelRc.EXPIRED),
        (WrongDeviceError, ModelRc.WRONG_DEVICE),
        (WrongHardwareError, ModelRc.WRONG_HARDWARE),
        (ReplayError, ModelRc.NONCE),
    )
    return next((rc for error, rc in codes if isinstance(exc, error)), ModelRc.BAD_REQUEST)


def _check_fit(contents: BundleContents, device: DeviceFacts) -> None:
    manifest = contents.manifest
    built_for = manifest.target(device.target.hardware_id)
    if built_for is None:
        names = ", ".join(t.hardware_id for t in manifest.targets)
        raise Refusal(
            ModelRc.DOES_NOT_FIT, f"bundle is built for {names}, not {device.target.hardware_id}"
        )
    reasons = device.target.misfits(manifest, contents.size)
    if not built_for.firmware.contains(device.firmware_version):
        below = f" <{built_for.firmware.below}" if built_for.firmware.below else ""
        reasons.append(
            f"needs firmware >={built_for.firmware.minimum}{below}, device runs"
            f" {device.firmware_version}"
        )
    if reasons:
        raise Refusal(ModelRc.DOES_NOT_FIT, "; ".join(reasons))
