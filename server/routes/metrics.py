"""A model version's field figures and drift, per hardware id and event-time span."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from server import metrics
from server.auth import PERMISSIONS, Principal
from server.deps import ReaderDep, SessionDep, StateDep
from server.drift import PSI_ZERO_PROPORTION
from server.errors import ApiError
from server.schemas import (
    REFUSALS,
    DayFigures,
    DriftFigures,
    Figures,
    SpanPublic,
    VersionDrift,
    VersionMetrics,
)
from server.telemetry import batch_counts

router = APIRouter(prefix="/v1", tags=["metrics"], responses=REFUSALS)

#: How drift's chi-square test is made, said in every answer.
CHI2_METHOD = (
    "Pearson chi-square test of independence on the 2 x k table of the two count vectors,"
    " bins empty on both sides left out, no continuity correction; Jensen-Shannon divergence"
    " in bits (base 2); PSI with natural logarithm"
)

HardwareQuery = Annotated[str | None, Query(description="catalogue hardware id; all if absent")]
#: An ISO 8601 date, or a date and time with an optional UTC offset.
ISO_TIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"
FromQuery = Annotated[
    str | None,
    Query(
        alias="from",
        pattern=ISO_TIME,
        description="ISO 8601 date or time, UTC (default: 7 days before 'to')",
    ),
]
ToQuery = Annotated[
    str | None,
    Query(
        pattern=ISO_TIME,
        description="ISO 8601 date (through that day) or time (exclusive), UTC; default now",
    ),
]


def _span(
    state: StateDep,
    name: str,
    version: str,
    hardware_id: HardwareQuery = None,
    start: FromQuery = None,
    to: ToQuery = None,
) -> metrics.Span:
    """The version and event-time span a figures route is asked about (path and query)."""
    if hardware_id is not None and hardware_id not in state.catalogue.targets:
        raise ApiError(
            400,
            f"unknown hardware id {hardware_id!r}; known: "
            + ", ".join(sorted(state.catalogue.targets)),
        )
    return metrics.make_span(name, version, hardware_id, start, to, now=datetime.now(UTC))


SpanDep = Annotated[metrics.Span, Depends(_span)]


def _public(span: metrics.Span) -> SpanPublic:
    return SpanPublic(
        model=span.model,
        version=span.version,
        hardware_id=span.hardware_id,
        start=span.start,
        end=span.end,
    )


def _privileged(who: Principal) -> bool:
    """Operators (and admins) see figures over fewer devices than the minimum, with the count."""
    return who.role in PERMISSIONS["operate"]


@router.get("/models/{name}/versions/{version}/metrics")
def version_metrics(
    session: SessionDep,
    state: StateDep,
    who: ReaderDep,
    span: SpanDep,
    by: Literal["day", "none"] = "day",
) -> VersionMetrics:
    """Inferences, devices, error and self-test failure rates, latency quantiles, outputs,
    feedback, accuracy from labels and completeness, in total and per event-time day."""
    accuracy = state.settings.telemetry_relative_accuracy
    found = metrics.collect(session, span, accuracy)
    manifest = metrics.reference(session, span)
    minimum = state.settings.min_devices_shown
    privileged = _privileged(who)
    # Every day's devices are among the total's: read their batch counts once.
    known = batch_counts(session, sorted(found.total.devices)) if by == "day" else None

    def figures(group: metrics.Group) -> dict[str, object]:
        return metrics.figures(
            session,
            group,
            manifest,
            min_devices=minimum,
            privileged=privileged,
            known_batches=known,
        )

    return VersionMetrics(
        span=_public(span),
        min_devices_shown=minimum,
        skipped_rows=found.skipped_rows,
        total=Figures.model_validate(figures(found.total)),
        days=[
            DayFigures.model_validate({"day": day, **figures(group)})
            for day, group in sorted(found.days.items())
        ]
        if by == "day"
        else [],
    )


@router.get("/models/{name}/versions/{version}/drift")
def version_drift(
    session: SessionDep,
    state: StateDep,
    who: ReaderDep,
    span: SpanDep,
    against: Annotated[
        str, Query(description="'reference' (the manifest's) or another version of the model")
    ] = "reference",
) -> VersionDrift:
    """PSI, Jensen-Shannon divergence, chi-square and the largest proportion difference per
    input feature and output, against the manifest's reference or another version over the
    same span, from counts on the manifest's fixed bins."""
    accuracy = state.settings.telemetry_relative_accuracy
    found = metrics.collect(session, span, accuracy)
    manifest = metrics.reference(session, span)
    skipped = found.skipped_rows
    minimum = state.settings.min_devices_shown
    privileged = _privileged(who)
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
        baseline_devices = len(other.total.devices)
        if baseline_devices < minimum and not privileged:
            figures = {"withheld": f"too few devices on {against} (fewer than {minimum})"}
            baseline_devices = None
        baseline = {
            "inputs": other.total.aggregate["inputs"],
            "outputs": other.total.aggregate["outputs"],
        }
    if against == "reference" or baseline_devices is not None:
        figures = metrics.drift_figures(
            found.total, baseline, manifest, min_devices=minimum, privileged=privileged
        )
    return VersionDrift(
        span=_public(span),
        against=against,
        min_devices_shown=minimum,
        psi_zero_proportion=PSI_ZERO_PROPORTION,
        method=CHI2_METHOD,
        baseline_devices_reporting=baseline_devices,
        skipped_rows=skipped,
        drift=DriftFigures.model_validate(figures),
    )
