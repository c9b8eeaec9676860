"""A model version's field figures and drift, per hardware id and event-time span."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from server import metrics, reports
from server.deps import ReaderDep, SessionDep, StateDep
from server.schemas import REFUSALS, VersionDrift, VersionMetrics

router = APIRouter(prefix="/v1", tags=["metrics"], responses=REFUSALS)

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
    return reports.span(
        state.catalogue, name, version, hardware_id, start, to, now=datetime.now(UTC)
    )


SpanDep = Annotated[metrics.Span, Depends(_span)]


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
    return reports.version_metrics(session, state.settings, span, who, by_day=by == "day")


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
    return reports.version_drift(session, state.settings, span, who, against)
