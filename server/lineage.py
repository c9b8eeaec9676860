"""A model version's lineage: from the training source and data hashes in its manifest's
provenance, through the converter's variant choice, accuracy and size per target, the bundles'
SHA-256s and the rig's verdicts, the releases and rollouts with their dates, to the devices
running it per day and its field figures.

Everything comes from what publish, release, rollouts and telemetry stored; nothing is fetched.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from sqlalchemy import func
from sqlmodel import Session, col, select

from firmware_bundles import BundleError
from firmware_bundles.manifest import Manifest, Provenance
from firmware_bundles.provenance import MlflowSource
from firmware_bundles.rig_report import HilReport, verify_hil_report
from firmware_bundles.root import Root
from firmware_bundles.signing import Envelope
from server import fold, metrics
from server.lineage_schemas import (
    ConfirmationPublic,
    DevicesOnDay,
    FieldSummary,
    HilRunPublic,
    HilVerdict,
    Lineage,
    MlflowLinks,
    QuantisationPublic,
    ReleasePublic,
    RolloutSummary,
    TargetLineage,
)
from server.models import (
    Bundle,
    Confirmation,
    ModelVersion,
    Release,
    Rollout,
    RolloutDecision,
)
from server.registry import get_version
from server.schemas import Figures, SpanPublic


def lineage(
    session: Session,
    model: str,
    version: str,
    *,
    root: Root,
    relative_accuracy: float,
    min_devices: int,
    privileged: bool,
    now: datetime | None = None,
) -> Lineage:
    """The lineage of ``model`` ``version``; field figures over the seven days up to ``now``.

    Raises:
        ApiError: 404 for an unknown model or version.
    """
    found = get_version(session, model, version)
    assert found.id is not None
    bundles = list(
        session.exec(
            select(Bundle).where(Bundle.version_id == found.id).order_by(col(Bundle.target_id))
        )
    )
    releases = list(
        session.exec(
            select(Release)
            .where(Release.version_id == found.id)
            .order_by(col(Release.released_at), col(Release.id))
        )
    )
    released: dict[str, list[datetime]] = defaultdict(list)
    for r in releases:
        released[r.target_id].append(r.released_at)
    manifests = [Manifest.from_dict(b.manifest) for b in bundles]
    provenance = None if found.provenance is None else Provenance.from_dict(found.provenance)
    return Lineage(
        model=model,
        version=version,
        release_counter=found.release_counter,
        task=manifests[0].task if manifests else None,
        published_by=found.published_by,
        published_at=found.published_at,
        withdrawn=found.withdrawn,
        provenance=provenance,
        mlflow=None
        if provenance is None or provenance.mlflow is None
        else mlflow_links(provenance.mlflow),
        targets=[
            _target(b, m, root, released[b.target_id])
            for b, m in zip(bundles, manifests, strict=True)
        ],
        releases=[
            ReleasePublic(
                hardware_id=r.target_id, released_at=r.released_at, released_by=r.released_by
            )
            for r in releases
        ],
        confirmations=[
            ConfirmationPublic.model_validate(c, from_attributes=True)
            for c in session.exec(
                select(Confirmation)
                .where(Confirmation.version_id == found.id)
                .order_by(col(Confirmation.confirmed_at), col(Confirmation.id))
            )
        ],
        rollouts=_rollouts(session, found),
        devices_per_day=devices_per_day(session, model, version),
        field=_field(
            session,
            model,
            version,
            now or datetime.now(UTC),
            relative_accuracy=relative_accuracy,
            min_devices=min_devices,
            privileged=privileged,
        ),
    )


def _web_base(uri: str) -> str | None:
    """The MLflow UI's address for a tracking or registry URI: only an http(s) one has one."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return uri.rstrip("/")


def mlflow_links(source: MlflowSource) -> MlflowLinks:
    """Links into MLflow's UI for the run and the registered model version a bundle came from
    (the UI's own routes: ``#/experiments/E/runs/R``, ``#/runs/R``, ``#/models/N/versions/V``)."""
    tracking, registry = _web_base(source.tracking_uri), _web_base(source.registry_uri)
    run = None
    if tracking is not None and source.run_id:
        run_id = quote(source.run_id, safe="")
        run = (
            f"{tracking}/#/experiments/{quote(source.experiment_id, safe='')}/runs/{run_id}"
            if source.experiment_id
            else f"{tracking}/#/runs/{run_id}"
        )
    model = version = None
    if registry is not None and source.model_name and source.model_version:
        model = f"{registry}/#/models/{quote(source.model_name, safe='')}"
        version = f"{model}/versions/{quote(source.model_version, safe='')}"
    return MlflowLinks(run=run, model_version=version, registered_model=model)


def _target(
    bundle: Bundle, manifest: Manifest, root: Root, released_at: list[datetime]
) -> TargetLineage:
    return TargetLineage(
        hardware_id=bundle.target_id,
        bundle_sha256=bundle.sha256,
        bundle_bytes=bundle.length,
        format=manifest.runtime.format,
        precision=manifest.runtime.precision,
        quantisation=QuantisationPublic.model_validate(manifest.quantisation, from_attributes=True),
        metrics=dict(manifest.metrics),
        ram_estimate_bytes=manifest.runtime.ram_estimate.bytes,
        op_types=list(manifest.runtime.op_types),
        firmware_min=bundle.firmware_min,
        firmware_below=bundle.firmware_below,
        hil=None if bundle.hil_report is None else hil_verdict(bundle, bundle.hil_report, root),
        released_at=released_at,
    )


def hil_verdict(bundle: Bundle, data: bytes, root: Root) -> HilVerdict | None:
    """The attached rig report's verdict for ``bundle`` on its target.

    The report verified when it was attached; if it no longer verifies against ``root`` (its
    ``hil`` key rotated out), its content is shown with ``signature_valid`` false and why.
    None only if the stored bytes are no report at all (they were checked on attach).
    """
    problem = None
    try:
        report = verify_hil_report(data, root)
    except BundleError as exc:
        problem = str(exc)
        try:
            report = HilReport.from_dict(Envelope.from_bytes(data, "hil report").signed)
        except BundleError:
            return None
    return HilVerdict(
        passed=report.passed_for(bundle.sha256, bundle.target_id),
        signature_valid=problem is None,
        problem=problem,
        started_at=report.started_at,
        finished_at=report.finished_at,
        faults=list(report.faults),
        runs=[
            HilRunPublic.model_validate(r, from_attributes=True)
            for r in report.runs_of(bundle.sha256, bundle.target_id)
        ],
    )


def _rollouts(session: Session, version: ModelVersion) -> list[RolloutSummary]:
    rollouts = list(
        session.exec(
            select(Rollout).where(Rollout.version_id == version.id).order_by(col(Rollout.id))
        )
    )
    counts = {
        rollout_id: (int(n), last)
        for rollout_id, n, last in session.exec(
            select(RolloutDecision.rollout_id, func.count(), func.max(RolloutDecision.id))
            .where(col(RolloutDecision.rollout_id).in_([r.id for r in rollouts]))
            .group_by(col(RolloutDecision.rollout_id))
        )
    }
    summaries = []
    for rollout in rollouts:
        assert rollout.id is not None
        n, last_id = counts.get(rollout.id, (0, None))
        last = None if last_id is None else session.get(RolloutDecision, last_id)
        summaries.append(
            RolloutSummary(
                id=rollout.id,
                state=rollout.state,
                stage=rollout.stage + 1,
                percent=rollout.stages[rollout.stage]["percent"],
                hardware_ids=list(rollout.selector.get("hardware_ids", [])),
                created_at=rollout.created_at,
                started_at=rollout.started_at,
                finished_at=rollout.finished_at,
                decisions=n,
                last_decision_at=None if last is None else last.at,
                last_action=None if last is None else last.action,
                last_reason=None if last is None else last.reason,
            )
        )
    return summaries


def devices_per_day(session: Session, model: str, version: str) -> list[DevicesOnDay]:
    """Per event-time day, the devices that uploaded telemetry of the version (from their day
    rollups and windows not yet folded) and their inferences."""
    devices: dict[str, set[str]] = {}
    inferences: dict[str, int] = {}
    for row in fold.day_rows(session, model=model, version=version):
        devices.setdefault(row.day, set()).add(row.device_id)
        inferences[row.day] = inferences.get(row.day, 0) + int(row.values["inference_count"])
    return [
        DevicesOnDay(day=day, devices=len(devices[day]), inferences=inferences[day])
        for day in sorted(devices)
    ]


def _field(
    session: Session,
    model: str,
    version: str,
    now: datetime,
    *,
    relative_accuracy: float,
    min_devices: int,
    privileged: bool,
) -> FieldSummary:
    span = metrics.make_span(model, version, None, None, None, now=now)
    found = metrics.collect(session, span, relative_accuracy)
    manifest = metrics.reference(session, span)  # publish gives every version a bundle
    total = metrics.figures(
        session, found.total, manifest, min_devices=min_devices, privileged=privileged
    )
    return FieldSummary(
        span=SpanPublic(
            model=model, version=version, hardware_id=None, start=span.start, end=span.end
        ),
        min_devices_shown=min_devices,
        skipped_rows=found.skipped_rows,
        total=Figures.model_validate(total),
    )
