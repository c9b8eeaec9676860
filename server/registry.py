"""The registry: publishing verified bundles, and the release state devices are assigned from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from firmware_bundles import ArchiveLimits, BundleError, bundle_id, verify
from firmware_bundles.errors import CatalogueError
from firmware_bundles.manifest import semver_key
from firmware_bundles.messages import HilReport, verify_hil_report
from firmware_bundles.reference import ReferenceFile
from server.arms import OWNING
from server.errors import ApiError
from server.models import Bundle, Device, Model, ModelVersion, Pin, Release, Rollout
from server.state import ServerState


def publish(*, session: Session, state: ServerState, data: bytes, publisher: str) -> Bundle:
    """Verify a bundle against the trusted root and the catalogue, then store and register it.

    Raises:
        ApiError: 400 with the reason if it does not verify or fit its target; 409 if the same
            version exists with another release counter.
    """
    limits = ArchiveLimits(max_total_bytes=state.settings.max_bundle_upload_bytes)
    try:
        verified = verify(data, state.trusted.root, limits=limits)
    except BundleError as exc:
        raise ApiError(400, f"bundle refused: {exc}") from exc
    manifest = verified.manifest
    if len(manifest.targets) != 1:
        raise ApiError(400, "bundle refused: a bundle must name exactly one target")
    target = manifest.targets[0]
    try:
        state.catalogue.check_fits(manifest, target.target_id, len(data))
    except CatalogueError as exc:
        raise ApiError(400, f"bundle refused: {exc}") from exc
    sha = bundle_id(data)
    existing = session.get(Bundle, sha)
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
        select(Bundle).where(Bundle.version_id == version.id, Bundle.target_id == target.target_id)
    ).first()
    if clash is not None:
        raise ApiError(
            409,
            f"{manifest.name} {manifest.version} already has bundle"
            f" {clash.sha256[:12]} for {target.target_id}; publish a new version",
        )
    state.blobs.put(data)
    assert version.id is not None
    refs = manifest.reference_histograms
    reference = None
    if isinstance(refs, ReferenceFile) and not refs.detached:
        reference = verified.file(refs.file)  # a detached one is uploaded beside it later
    bundle = Bundle(
        sha256=sha,
        version_id=version.id,
        target_id=target.target_id,
        length=len(data),
        format=manifest.runtime.format,
        firmware_min=target.firmware.minimum,
        firmware_below=target.firmware.below,
        op_types=manifest.runtime.op_types,
        manifest=manifest.to_dict(),
        reference=reference,
    )
    session.add(bundle)
    session.commit()
    return bundle


def attach_hil_report(
    *, session: Session, state: ServerState, sha256: str, data: bytes
) -> dict[str, Any]:
    """Attach a rig's signed report to a published bundle (replacing an earlier one).

    A report is kept whether it passed or not, as evidence; only a passing one opens the release
    gate (:func:`release`).

    Raises:
        ApiError: 404 for an unknown bundle; 400 if the report is not signed by the root's ``hil``
            role or has no run of this bundle on a device of its target.
    """
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise ApiError(404, f"no bundle {sha256}")
    report = _verified_report(state, data)
    runs = [
        r
        for r in report.runs
        if r.bundle is not None and r.bundle.sha256 == sha256 and r.hardware_id == bundle.target_id
    ]
    if not runs:
        raise ApiError(
            400,
            f"HIL report refused: it has no run of bundle {sha256[:12]} on a"
            f" {bundle.target_id} device",
        )
    bundle.hil_report = data
    session.add(bundle)
    session.commit()
    return {
        "sha256": sha256,
        "target_id": bundle.target_id,
        "runs": len(runs),
        "passed": report.passed_for(sha256, bundle.target_id),
    }


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
    target: str | None,
    by: str,
    state: ServerState,
) -> list[str]:
    """Make ``version`` current for ``target`` (or every target it has a bundle for).

    When the server requires HIL reports (``require_hil_report``), every target released must
    have a bundle with a passing rig report attached; otherwise nothing is released.

    Returns:
        The target ids released.

    Raises:
        ApiError: 404 if unknown, 409 if withdrawn, without a bundle for the target, or held by
            the HIL gate (naming each target and why).
    """
    found = get_version(session, model, version)
    if found.withdrawn:
        raise ApiError(409, f"{model} {version} is withdrawn")
    bundles = session.exec(select(Bundle).where(Bundle.version_id == found.id)).all()
    targets = sorted({b.target_id for b in bundles})
    if target is not None:
        if target not in targets:
            raise ApiError(
                409,
                f"{model} {version} has no bundle for {target};"
                f" it has: {', '.join(targets) or 'none'}",
            )
        targets = [target]
    _refuse_if_owned(session, model, targets, "release")
    if state.settings.require_hil_report:
        by_target = {b.target_id: b for b in bundles}
        held = {t: why for t in targets if (why := _hil_gate(state, by_target[t])) is not None}
        if held:
            raise ApiError(
                409,
                f"{model} {version} held by the HIL gate: "
                + "; ".join(f"{t}: {why}" for t, why in sorted(held.items())),
            )
    now = datetime.now(UTC)
    assert found.id is not None
    for t in targets:
        session.add(
            Release(
                model_name=model, target_id=t, version_id=found.id, released_at=now, released_by=by
            )
        )
    session.commit()
    return targets


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


def get_bundle(session: Session, sha256: str) -> Bundle:
    """Raises: ApiError 404 for an unknown bundle."""
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise ApiError(404, f"no bundle {sha256}")
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
