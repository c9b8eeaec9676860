"""The registry: publishing verified bundles, and the release state devices are assigned from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from firmware_bundles import ArchiveLimits, BundleError, BundleReader, VerifiedBundle
from firmware_bundles.errors import CatalogueError
from firmware_bundles.manifest import semver_key
from firmware_bundles.reference import ReferenceFile
from firmware_bundles.rig_report import HilReport, verify_hil_report
from server import notify
from server.arms import OWNING
from server.errors import ApiError
from server.models import Bundle, Device, Model, ModelVersion, Pin, Release, Rollout
from server.schemas import HilReportAttached
from server.state import BlobSpool, ServerState


class BundleUpload:
    """A bundle arriving in pieces: verified as it streams by and spooled to the blob store.

    The release signatures are checked as soon as the manifest has arrived, and every file is
    hashed as it passes, so a bad upload is refused before the rest of it is read; the model's
    bytes are never held in memory.
    """

    def __init__(self, state: ServerState) -> None:
        limits = ArchiveLimits(max_total_bytes=state.settings.max_bundle_upload_bytes)
        self._reader = BundleReader(
            limits, root=state.trusted.root, keep_files=False, with_bundle_sha256=True
        )
        self._spool: BlobSpool = state.blobs.spool()
        self.length = 0

    def feed(self, piece: bytes) -> None:
        """Take the next bytes of the upload.

        Raises:
            ApiError: 400 naming the problem as soon as the bytes so far show the bundle is bad.
        """
        try:
            self._reader.feed(piece)
        except BundleError as exc:
            raise ApiError(400, f"bundle refused: {exc}") from exc
        self._spool.write(piece)
        self.length += len(piece)

    def finish(self) -> VerifiedBundle:
        """The verified bundle, once every byte was fed.

        Raises:
            ApiError: 400 if the archive ended early or lacks a listed file.
        """
        try:
            return self._reader.finish_verified()
        except BundleError as exc:
            raise ApiError(400, f"bundle refused: {exc}") from exc

    def keep(self, sha256: str) -> None:
        """File the spooled bytes in the blob store (durably) under their SHA-256."""
        self._spool.keep(sha256)

    def discard(self) -> None:
        """Drop the spooled bytes (no-op once kept)."""
        self._spool.discard()


def publish(
    *, session: Session, state: ServerState, upload: BundleUpload, publisher: str
) -> Bundle:
    """Register a bundle whose bytes were all fed to ``upload``, and keep its blob.

    Raises:
        ApiError: 400 with the reason if it does not verify or fit its target; 409 if the same
            version exists with another release counter.
    """
    verified = upload.finish()
    manifest = verified.manifest
    if len(manifest.targets) != 1:
        raise ApiError(400, "bundle refused: a bundle must name exactly one target")
    target = manifest.targets[0]
    try:
        state.catalogue.check_fits(manifest, target.hardware_id, upload.length)
    except CatalogueError as exc:
        raise ApiError(400, f"bundle refused: {exc}") from exc
    bundle_sha256 = verified.contents.bundle_sha256
    assert bundle_sha256 is not None  # the reader hashed the archive
    existing = session.get(Bundle, bundle_sha256)
    if existing is not None:
        return existing
    now = datetime.now(UTC)
    if session.get(Model, manifest.name) is None:
        session.add(Model(name=manifest.name, created_at=now))
    version = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_name == manifest.name, ModelVersion.version == manifest.version
        )
    ).first()
    if version is None:
        version = ModelVersion(
            model_name=manifest.name,
            version=manifest.version,
            release_counter=manifest.release_counter,
            published_by=publisher,
            published_at=now,
            provenance=manifest.provenance.to_dict(),
        )
        session.add(version)
        session.flush()
    elif version.release_counter != manifest.release_counter:
        raise ApiError(
            409,
            f"{manifest.name} {manifest.version} exists with release counter"
            f" {version.release_counter}, bundle says {manifest.release_counter}",
        )
    clash = session.exec(
        select(Bundle).where(
            Bundle.version_id == version.id, Bundle.target_id == target.hardware_id
        )
    ).first()
    if clash is not None:
        raise ApiError(
            409,
            f"{manifest.name} {manifest.version} already has bundle"
            f" {clash.sha256[:12]} for {target.hardware_id}; publish a new version",
        )
    upload.keep(bundle_sha256)
    assert version.id is not None
    refs = manifest.reference_histograms
    reference = None
    if isinstance(refs, ReferenceFile) and not refs.detached:
        # A detached one is uploaded beside it later. The upload kept the files beside the
        # model that are no bigger than a manifest may be.
        if refs.file not in verified.contents.files:
            raise ApiError(400, f"bundle refused: reference file {refs.file!r} is over the cap")
        reference = verified.file(refs.file)
    bundle = Bundle(
        sha256=bundle_sha256,
        version_id=version.id,
        target_id=target.hardware_id,
        length=upload.length,
        format=manifest.runtime.format,
        firmware_min=target.firmware.minimum,
        firmware_below=target.firmware.below,
        op_types=manifest.runtime.op_types,
        manifest=manifest.to_dict(),
        reference=reference,
    )
    session.add(bundle)
    notify.emit(
        session,
        "bundle.published",
        {
            "model": manifest.name,
            "version": manifest.version,
            "hardware_id": target.hardware_id,
            "bundle_sha256": bundle_sha256,
            "length": upload.length,
            "published_by": publisher,
        },
        now=now,
    )
    session.commit()
    return bundle


def publish_bytes(*, session: Session, state: ServerState, data: bytes, publisher: str) -> Bundle:
    """:func:`publish` for a bundle already in memory (seeding scripts and benchmarks).

    Raises:
        ApiError: As :func:`publish`.
    """
    upload = BundleUpload(state)
    try:
        upload.feed(data)
        return publish(session=session, state=state, upload=upload, publisher=publisher)
    finally:
        upload.discard()


def attach_hil_report(
    *, session: Session, state: ServerState, bundle_sha256: str, data: bytes
) -> HilReportAttached:
    """Attach a rig's signed report to a published bundle (replacing an earlier one).

    A report is kept whether it passed or not, as evidence; only a passing one opens the release
    gate (:func:`release`).

    Raises:
        ApiError: 404 for an unknown bundle; 400 if the report is not signed by the root's ``hil``
            role or has no run of this bundle on a device of its target.
    """
    bundle = get_bundle(session, bundle_sha256)
    report = _verified_report(state, data)
    runs = report.runs_of(bundle_sha256, bundle.target_id)
    if not runs:
        raise ApiError(
            400,
            f"HIL report refused: it has no run of bundle {bundle_sha256[:12]} on a"
            f" {bundle.target_id} device",
        )
    bundle.hil_report = data
    session.add(bundle)
    session.commit()
    return HilReportAttached(
        sha256=bundle_sha256,
        target_id=bundle.target_id,
        runs=len(runs),
        passed=report.passed_for(bundle_sha256, bundle.target_id),
    )


def _verified_report(state: ServerState, data: bytes) -> HilReport:
    try:
        return verify_hil_report(data, state.trusted.root)
    except BundleError as exc:
        raise ApiError(400, f"HIL report refused: {exc}") from exc


def _hil_gate(state: ServerState, bundle: Bundle) -> str | None:
    """Why ``bundle`` may not be released under the HIL gate, or None if it may.

    The report is verified again against the current root, so a report whose ``hil`` key has
    since been rotated out no longer counts.
    """
    if bundle.hil_report is None:
        return "no HIL report attached (edgefleet publish --hil-report REPORT)"
    try:
        report = _verified_report(state, bundle.hil_report)
    except ApiError as exc:
        return exc.reason
    if not report.passed_for(bundle.sha256, bundle.target_id):
        return "its HIL report does not pass on this target"
    return None


def get_version(session: Session, model: str, version: str) -> ModelVersion:
    """Raises: ApiError 404 if unknown."""
    found = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_name == model, ModelVersion.version == version
        )
    ).first()
    if found is None:
        raise ApiError(404, f"no version {version} of model {model}")
    return found


def release(
    *,
    session: Session,
    model: str,
    version: str,
    hardware_id: str | None,
    by: str,
    state: ServerState,
) -> list[str]:
    """Make ``version`` current for ``hardware_id`` (or every one it has a bundle for).

    When the server requires HIL reports (``require_hil_report``), every hardware id released must
    have a bundle with a passing rig report attached; otherwise nothing is released.

    Returns:
        The hardware ids released.

    Raises:
        ApiError: 404 if unknown, 409 if withdrawn, without a bundle for the target, or held by
            the HIL gate (naming each target and why).
    """
    found = get_version(session, model, version)
    if found.withdrawn:
        raise ApiError(409, f"{model} {version} is withdrawn")
    bundles = session.exec(select(Bundle).where(Bundle.version_id == found.id)).all()
    hardware_ids = sorted({b.target_id for b in bundles})
    if hardware_id is not None:
        if hardware_id not in hardware_ids:
            raise ApiError(
                409,
                f"{model} {version} has no bundle for {hardware_id};"
                f" it has: {', '.join(hardware_ids) or 'none'}",
            )
        hardware_ids = [hardware_id]
    _refuse_if_owned(session, model, hardware_ids, "release")
    if state.settings.require_hil_report:
        by_hardware = {b.target_id: b for b in bundles}
        held = {
            h: why for h in hardware_ids if (why := _hil_gate(state, by_hardware[h])) is not None
        }
        if held:
            raise ApiError(
                409,
                f"{model} {version} held by the HIL gate: "
                + "; ".join(f"{h}: {why}" for h, why in sorted(held.items())),
            )
    now = datetime.now(UTC)
    assert found.id is not None
    for h in hardware_ids:
        session.add(
            Release(
                model_name=model, target_id=h, version_id=found.id, released_at=now, released_by=by
            )
        )
    released(session, model, version, hardware_ids, by=by, now=now)
    session.commit()
    return hardware_ids


def released(
    session: Session, model: str, version: str, hardware_ids: list[str], *, by: str, now: datetime
) -> None:
    """Emit ``version.released`` for releases just added (the caller commits)."""
    data = {"model": model, "version": version, "hardware_ids": hardware_ids, "released_by": by}
    notify.emit(session, "version.released", data, now=now)


def owning_rollout(session: Session, model: str, hardware_ids: list[str]) -> Rollout | None:
    """A rollout of ``model`` that still owns one of ``hardware_ids`` (see
    :data:`server.arms.OWNING`), if any."""
    for rollout in session.exec(
        select(Rollout).where(Rollout.model_name == model, col(Rollout.state).in_(OWNING))
    ):
        if set(rollout.selector["hardware_ids"]) & set(hardware_ids):
            return rollout
    return None


def _refuse_if_owned(session: Session, model: str, hardware_ids: list[str], what: str) -> None:
    """Raises: ApiError 409 naming the rollout that owns ``model`` on these hardware ids."""
    owner = owning_rollout(session, model, hardware_ids)
    if owner is not None:
        raise ApiError(
            409,
            f"cannot {what} {model}: rollout {owner.id} ({owner.state}) of it covers"
            f" {', '.join(owner.selector['hardware_ids'])}; abort, roll back or finish it first",
        )


def withdraw(*, session: Session, model: str, version: str) -> None:
    """Stop assigning ``version``; its devices fall back to the previous released version.

    Raises:
        ApiError: 404 if unknown; 409 while a rollout of the model covers its hardware ids.
    """
    found = get_version(session, model, version)
    built = list(session.exec(select(Bundle.target_id).where(Bundle.version_id == found.id)))
    _refuse_if_owned(session, model, built, "withdraw a version of")
    found.withdrawn = True
    session.add(found)
    session.commit()


def pin(*, session: Session, device_id: str, model: str, version: str | None) -> None:
    """Hold a device on ``version`` of ``model``; ``None`` removes the pin.

    Raises:
        ApiError: 404 for an unknown device or version.
    """
    if session.get(Device, device_id) is None:
        raise ApiError(404, f"no device {device_id}")
    existing = session.get(Pin, (device_id, model))
    if version is None:
        if existing is not None:
            session.delete(existing)
            session.commit()
        return
    found = get_version(session, model, version)
    assert found.id is not None
    if existing is None:
        session.add(Pin(device_id=device_id, model_name=model, version_id=found.id))
    else:
        existing.version_id = found.id
        session.add(existing)
    session.commit()


def get_bundle(session: Session, bundle_sha256: str) -> Bundle:
    """Raises: ApiError 404 for an unknown bundle."""
    bundle = session.get(Bundle, bundle_sha256)
    if bundle is None:
        raise ApiError(404, f"no bundle {bundle_sha256}")
    return bundle


def get_model(session: Session, name: str) -> dict[str, Any]:
    """One model as :func:`list_models` has it.

    Raises:
        ApiError: 404 for an unknown model.
    """
    for model in list_models(session, name):
        if model["name"] == name:
            return model
    raise ApiError(404, f"no model {name}")


def list_models(session: Session, name: str | None = None) -> list[dict[str, Any]]:
    """Every model (or only ``name``), its versions (newest first) and bundles per target."""
    query = select(ModelVersion)
    if name is not None:
        query = query.where(ModelVersion.model_name == name)
    versions = session.exec(query).all()
    bundles = session.exec(select(Bundle)).all()
    releases = session.exec(select(Release)).all()
    by_version: dict[int, list[Bundle]] = {}
    for b in bundles:
        by_version.setdefault(b.version_id, []).append(b)
    released: dict[int, set[str]] = {}
    for r in releases:
        released.setdefault(r.version_id, set()).add(r.target_id)
    models: dict[str, dict[str, Any]] = {}
    for v in sorted(versions, key=lambda v: semver_key(v.version), reverse=True):
        entry = models.setdefault(v.model_name, {"name": v.model_name, "versions": []})
        entry["versions"].append(
            {
                "version": v.version,
                "release_counter": v.release_counter,
                "published_by": v.published_by,
                "published_at": v.published_at.isoformat(),
                "withdrawn": v.withdrawn,
                "released_for": sorted(released.get(v.id or -1, set())),
                "provenance": v.provenance,
                "bundles": [
                    {"sha256": b.sha256, "target_id": b.target_id, "length": b.length}
                    for b in sorted(by_version.get(v.id or -1, []), key=lambda b: b.target_id)
                ],
            }
        )
    return sorted(models.values(), key=lambda m: m["name"])
