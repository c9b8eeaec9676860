"""Every trust decision of a Primary (full verification), on bytes, with no I/O.

:class:`TrustedState` holds the trusted root (advanced only along its signed chain) and the
anti-rollback counters per model (:class:`~firmware_bundles.anti_rollback.ReleaseCounters`: the
floor rises only to a version the server confirmed and the device ran; ``docs/rollback.md``).
The updater fetches bytes and saves what this returns; this module decides whether the bytes are
trusted, in the manner of python-tuf's ``TrustedMetadataSet``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from device_agent.errors import TrustError, TrustKind
from firmware_bundles import (
    ArchiveError,
    ArchiveLimits,
    BundleError,
    CatalogueError,
    ExpiredError,
    ReplayError,
    RollbackError,
    SignatureError,
    TargetCatalogue,
    TrustedRoot,
    VerifiedBundle,
    WrongDeviceError,
    WrongHardwareError,
    parse_root,
    verify,
)
from firmware_bundles.anti_rollback import ReleaseCounters
from firmware_bundles.messages import Assignment, verify_assignments
from firmware_bundles.root import Root

#: Format 2 adds the installed and confirmed counters; format 1's ``release_counters`` (raised
#: at each activation under the old rule) are read as the floors, which they are.
_COUNTERS_FORMAT = 2


def _kind(exc: BundleError) -> TrustKind:
    """Which trust check a firmware_bundles error stands for, by its type."""
    kinds: tuple[tuple[type[BundleError], TrustKind], ...] = (
        (SignatureError, "signature"),
        (ExpiredError, "expired"),
        (RollbackError, "rollback"),
        (WrongDeviceError, "wrong-device"),
        (WrongHardwareError, "wrong-hardware"),
        (ReplayError, "replay"),
        (ArchiveError, "archive"),
        (CatalogueError, "target"),
    )
    return next((kind for error, kind in kinds if isinstance(exc, error)), "schema")


@dataclass(frozen=True)
class TrustedAssignments:
    """What a device may act on from one check-in answer, in the agent's terms.

    Attributes:
        assignments: The entries to bring into effect, in the set's order.
        refused: One ``rollback`` error per entry below its model's floor (the error names the
            model); the other models still update.
        withheld: Models the server has for this device but does not assign, and why.
        next_check_in_s: When the director asks to hear from the device again.
    """

    assignments: list[Assignment]
    refused: list[tuple[Assignment, TrustError]]
    withheld: dict[str, str]
    next_check_in_s: int


class TrustedState:
    """The root a device trusts and its anti-rollback counters.

    Takes bytes, makes every trust decision, does no I/O; callers persist :meth:`root_bytes` and
    :meth:`counters_to_bytes` after a change.
    """

    def __init__(
        self,
        trusted_root: TrustedRoot,
        release_counters: ReleaseCounters | Mapping[str, int] | None = None,
        catalogue: TargetCatalogue | None = None,
    ) -> None:
        self._trusted = trusted_root
        if not isinstance(release_counters, ReleaseCounters):
            release_counters = ReleaseCounters.from_floors(release_counters or {})
        self._counters = release_counters
        self._catalogue = catalogue or TargetCatalogue.load_default()

    @classmethod
    def from_bytes(
        cls,
        root_bytes: bytes,
        counters_bytes: bytes | None,
        now: datetime,
        *,
        catalogue: TargetCatalogue | None = None,
    ) -> TrustedState:
        """Load the pinned (or last rotated-to) root and the persisted release counters.

        The root must be signed by a threshold of its own root keys. Its expiry is checked by
        every later decision, not here: an agent whose root expired during weeks offline still
        starts and serves the models it has, and follows the chain to a fresh root when online.

        Args:
            root_bytes: ``root.json`` envelope bytes.
            counters_bytes: What :meth:`counters_to_bytes` returned, or None on first start.
            now: The current time (kept for symmetry with the other decisions; unused).
            catalogue: Target catalogue; the packaged one by default.

        Raises:
            TrustError: If the root is malformed or not self-signed, or the counters malformed.
        """
        del now
        try:
            envelope, root = parse_root(root_bytes)
            root.verify(envelope, "root")
        except BundleError as exc:
            raise TrustError(_kind(exc), f"pinned root: {exc}") from exc
        return cls(TrustedRoot(root, envelope), _parse_counters(counters_bytes), catalogue)

    @property
    def root(self) -> Root:
        """The trusted root."""
        return self._trusted.root

    @property
    def root_version(self) -> int:
        """Version of the trusted root."""
        return self._trusted.root.version

    def root_bytes(self) -> bytes:
        """The trusted root's envelope bytes, to persist after :meth:`update_root`."""
        return self._trusted.to_bytes()

    def update_root(self, data: bytes, now: datetime) -> Root:
        """Rotate to root version N+1, which a threshold of root N's and its own keys signed.

        Expiry is not checked on intermediate roots (as in TUF); call :meth:`check_root_expiry`
        once the chain is walked.

        Raises:
            TrustError: ``signature`` if either threshold is not met, ``rollback`` if the version
                is not exactly one above the trusted one, ``schema`` if malformed.
        """
        del now
        try:
            return self._trusted.update(data)
        except BundleError as exc:
            raise TrustError(_kind(exc), f"root rotation: {exc}") from exc

    def check_root_expiry(self, now: datetime) -> None:
        """Refuse to trust anything new under an expired root (freeze attack).

        Raises:
            TrustError: ``expired`` if the trusted root has expired at ``now``.
        """
        try:
            self._trusted.check_expiry(now)
        except ExpiredError as exc:
            raise TrustError("expired", str(exc)) from exc

    def release_counter(self, model: str) -> int:
        """The anti-rollback floor of ``model``: no assignment below it is accepted (0 if
        none)."""
        return self._counters.floor(model)

    @property
    def counters(self) -> ReleaseCounters:
        """Floors, highest installed and highest confirmed, per model."""
        return self._counters

    def verify_assignments(
        self, data: bytes, *, device_id: str, hardware_id: str, nonce: str, now: datetime
    ) -> TrustedAssignments:
        """Check the check-in answer (the director-signed assignment set) before acting on it.

        Checks, in order: the root has not expired, the director's signature threshold, the
        device id, the hardware id, the nonce this check-in sent and the expiry, each refusing
        the whole answer (one signature covers every model); then it hears each entry's
        confirmed release counter (which may raise that model's floor: call
        :meth:`counters_to_bytes` and persist if :attr:`counters` changed) and holds each entry's
        release counter to its model's floor, refusing that entry alone.

        Args:
            data: The check-in answer's bytes, as received.
            device_id: This device's id.
            hardware_id: This device's hardware (catalogue target) id.
            nonce: The nonce the check-in sent.
            now: The current time.

        Returns:
            The assignments to act on and the refused entries with their ``rollback`` errors.

        Raises:
            TrustError: ``expired``, ``signature``, ``wrong-device``, ``wrong-hardware``,
                ``replay`` or ``schema``.
        """
        self.check_root_expiry(now)
        try:
            verified = verify_assignments(
                data,
                self._trusted.root,
                device_id=device_id,
                hardware_id=hardware_id,
                nonce=nonce,
                now=now,
                min_release_counters=self._counters,
            )
        except BundleError as exc:
            raise TrustError(_kind(exc), str(exc)) from exc
        self._counters = verified.counters
        refused = [
            (r.assignment, TrustError("rollback", str(r.error), r.assignment.model))
            for r in verified.refused
        ]
        return TrustedAssignments(
            verified.assignments, refused, verified.withheld, verified.next_check_in_s
        )

    def verify_bundle(
        self,
        data: bytes,
        assignment: Assignment,
        hardware_id: str,
        *,
        firmware_version: str | None = None,
        now: datetime | None = None,
    ) -> VerifiedBundle:
        """Check downloaded bundle bytes against the assignment, the root and this device.

        Checks the bytes' length and SHA-256 against the assignment, the release signature
        threshold over the manifest, every file's hash and length, that the manifest's name,
        version and release counter are the assignment's (no mix-and-match), that the bundle is
        built for ``hardware_id`` and fits it in the catalogue, and that ``firmware_version`` is in
        the bundle's firmware range.

        Raises:
            TrustError: ``mismatch``, ``signature``, ``archive``, ``target``, ``rollback``,
                ``expired`` or ``schema``.
        """
        model = assignment.model
        if now is not None:
            self.check_root_expiry(now)
        if len(data) != assignment.bundle_length:
            raise TrustError(
                "mismatch",
                f"bundle is {len(data)} bytes, the assignment says {assignment.bundle_length}",
                model,
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != assignment.bundle_sha256:
            raise TrustError(
                "mismatch",
                f"bundle SHA-256 {digest[:16]}... differs from the assigned"
                f" {assignment.bundle_sha256[:16]}... (tampered in transit or at rest)",
                model,
            )
        try:
            bundle = verify(
                data,
                self._trusted.root,
                limits=ArchiveLimits(max_total_bytes=max(len(data), 1)),
                hardware_id=hardware_id,
                catalogue=self._catalogue,
            )
        except BundleError as exc:
            raise TrustError(_kind(exc), str(exc), model) from exc
        manifest = bundle.manifest
        claimed = (manifest.name, manifest.version, manifest.release_counter)
        assigned = (assignment.model, assignment.version, assignment.release_counter)
        if claimed != assigned:
            raise TrustError(
                "mismatch",
                f"bundle is {claimed[0]} {claimed[1]} (release counter {claimed[2]}), the"
                f" assignment names {assigned[0]} {assigned[1]} (release counter {assigned[2]})",
                model,
            )
        floor = self._counters.floor(model)
        if manifest.release_counter < floor:
            raise TrustError(
                "rollback",
                f"release counter {manifest.release_counter} is below {floor}, the floor for"
                f" {model}",
                model,
            )
        target = manifest.target(hardware_id)
        if (
            firmware_version is not None
            and target is not None
            and not target.firmware.contains(firmware_version)
        ):
            below = f", below {target.firmware.below}" if target.firmware.below else ""
            raise TrustError(
                "target",
                f"firmware {firmware_version} is outside the bundle's range"
                f" (from {target.firmware.minimum}{below})",
                model,
            )
        return bundle

    def record_installed(self, model: str, release_counter: int) -> bool:
        """Note that ``release_counter`` of ``model`` passed its self-test and is active.

        The version is on trial: the floor rises only as far as the server confirmed for this
        device (``docs/rollback.md``), so the director may still take the device back to it.

        Returns:
            Whether the counters changed (and so need persisting).
        """
        before = self._counters
        self._counters = before.record_installed(model, release_counter)
        return self._counters != before

    def counters_to_bytes(self) -> bytes:
        """The anti-rollback counters, to persist."""
        return json.dumps(
            {"format": _COUNTERS_FORMAT, **self._counters.to_dict()}, sort_keys=True
        ).encode()


def _parse_counters(data: bytes | None) -> ReleaseCounters:
    if data is None:
        return ReleaseCounters()
    try:
        doc: Any = json.loads(data)
    except ValueError as exc:
        raise TrustError("schema", f"release counters are not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("release_counters"), dict):
        raise TrustError("schema", "release counters must map model names to integers >= 0")
    try:
        return ReleaseCounters.from_dict(doc)
    except ValueError as exc:
        raise TrustError("schema", f"release counters: {exc}") from exc
