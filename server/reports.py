"""The figures API's answers (a version's metrics and drift over a span), built once here for the
API routes and the dashboard's pages, so a page and the API never disagree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from firmware_bundles import TargetCatalogue
from firmware_bundles.manifest import Manifest
from server import metrics
from server.auth import PERMISSIONS, Principal
from server.config import Settings
from server.drift import PSI_ZERO_PROPORTION
from server.errors import ApiError
from server.schemas import (
    DayFigures,
    DriftFigures,
    Figures,
    SpanPublic,
    VersionDrift,
    VersionMetrics,
)
from server.telemetry import batch_counts

#: How drift's chi-square test is made, said in every answer.
CHI2_METHOD = (
    "Pearson chi-square test of independence on the 2 x k table of the two count vectors,"
    " bins empty on both sides left out, no continuity correction; Jensen-Shannon divergence"
    " in bits (base 2); PSI with natural logarithm"
)


def span(
    catalogue: TargetCatalogue,
    name: str,
    version: str,
    hardware_id: str | None,
    start: str | None,
    to: str | None,
    *,
    now: datetime,
) -> metrics.Span:
    """The version and event-time span a figures query asks about.

    Raises:
        ApiError: 400 for an unknown hardware id, a bad time or an empty span.
    """
    if hardware_id is not None and hardware_id not in catalogue.targets:
        raise ApiError(
            400,
            f"unknown hardware id {hardware_id!r}; known: " + ", ".join(sorted(catalogue.targets)),
        )
    return metrics.make_span(name, version, hardware_id, start, to, now=now)


def span_public(span: metrics.Span) -> SpanPublic:
    return SpanPublic.model_validate(span, from_attributes=True)


def privileged(who: Principal) -> bool:
    """Operators (and admins) see figures over fewer devices than the minimum, with the count."""
    return who.role in PERMISSIONS["operate"]


def version_metrics(
    session: Session,
    settings: Settings,
    span: metrics.Span,
    who: Principal,
    *,
    by_day: bool,
    found: metrics.Collected | None = None,
) -> VersionMetrics:
    """Inferences, devices, error and self-test failure rates, latency quantiles, outputs,
    feedback, accuracy from labels and completeness, in total and (``by_day``) per day.

    ``found``: the span's data already collected (:func:`metrics.collect` of ``span``), so a page
    that also shows the span's drift reads it once.

    Raises:
        ApiError: 404 for an unknown version, or one without a bundle for the hardware id.
    """
    if found is None:
        found = metrics.collect(session, span, settings.telemetry_relative_accuracy)
    manifest = metrics.reference(session, span)
    minimum = settings.min_devices_shown
    allowed = privileged(who)

    # Every day's devices are among the total's: read their batch counts once.
    known = batch_counts(session, sorted(found.total.devices)) if by_day else None

    def figures(group: metrics.Group) -> dict[str, Any]:
        return metrics.figures(
            session,
            group,
            manifest,
            min_devices=minimum,
            privileged=allowed,
            known_batches=known,
        )

    return VersionMetrics(
        span=span_public(span),
        min_devices_shown=minimum,
        skipped_rows=found.skipped_rows,
        total=Figures.model_validate(figures(found.total)),
        days=[
            DayFigures.model_validate({"day": day, **figures(group)})
            for day, group in sorted(found.days.items())
        ]
        if by_day
        else [],
    )


def version_drift(
    session: Session,
    settings: Settings,
    span: metrics.Span,
    who: Principal,
    against: str,
    *,
    found: metrics.Collected | None = None,
) -> VersionDrift:
    """Drift per input feature and output against the manifest's reference (``against`` is
    ``"reference"``) or another version of the model over the same span (``found``: the span's
    data, if already collected).

    Raises:
        ApiError: 404 for an unknown version; 409 when the two sides' bins differ.
    """
    accuracy = settings.telemetry_relative_accuracy
    if found is None:
        found = metrics.collect(session, span, accuracy)
    manifest = metrics.reference(session, span)
    skipped = found.skipped_rows
    minimum = settings.min_devices_shown
    allowed = privileged(who)
    figures: dict[str, Any]
    if against == "reference":
        baseline = metrics.reference_counts(manifest)
        baseline_devices = None
    else:
        other = metrics.collect(
            session,
            metrics.Span(span.model, against, span.hardware_id, span.start, span.end),
            accuracy,
        )
        skipped += other.skipped_rows
        baseline_devices = other.total.device_count
        if baseline_devices < minimum and not allowed:
            figures = {"withheld": f"too few devices on {against} (fewer than {minimum})"}
            baseline_devices = None
        baseline = {
            "inputs": other.total.aggregate["inputs"],
            "outputs": other.total.aggregate["outputs"],
        }
    if against == "reference" or baseline_devices is not None:
        figures = metrics.drift_figures(
            found.total, baseline, manifest, min_devices=minimum, privileged=allowed
        )
    return VersionDrift(
        span=span_public(span),
        against=against,
        min_devices_shown=minimum,
        psi_zero_proportion=PSI_ZERO_PROPORTION,
        method=CHI2_METHOD,
        baseline_devices_reporting=baseline_devices,
        skipped_rows=skipped,
        drift=DriftFigures.model_validate(figures),
    )


def day_drift(
    settings: Settings, manifest: Manifest, day: metrics.Group, who: Principal
) -> DriftFigures:
    """Drift against the manifest's reference of one event-time day of a collected span (its
    group in :class:`metrics.Collected`): what :func:`version_drift` answers for a span of that
    day alone (cut to the span), whose rows are the same ones, without reading them again."""
    return DriftFigures.model_validate(
        metrics.drift_figures(
            day,
            metrics.reference_counts(manifest),
            manifest,
            min_devices=settings.min_devices_shown,
            privileged=privileged(who),
        )
    )
