"""The Device page's data: a device's history (``GET /v1/devices/{id}/history``: assignments,
pairing, last telemetry and completeness) and its events in a span (``GET .../events``, the same
function), counted per UTC day for the chart of installs, self-test failures and reverts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlmodel import Session

from server import device_events, device_history
from server.errors import ApiError
from server.metrics import parse_time
from server.ui import charts

#: The page lists at most this many events, newest first (the events API's largest page).
EVENTS_SHOWN = device_events.MAX_EVENTS_PER_PAGE
#: Charts over time have a point for every day up to this many; longer, only the days with data.
MAX_CONTIGUOUS_DAYS = 92
#: The event chart's series: (label, kind, outcomes counted; None for any).
EVENT_SERIES: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("installed", "install", ("ok",)),
    ("self-test failed", "install", ("self-test-failed",)),
    ("verify or download failed", "install", ("verify-failed", "download-failed")),
    ("reverted", "revert", None),
    ("switched", "switch", None),
)


def span_of(params: Mapping[str, str]) -> tuple[datetime | None, datetime | None]:
    """A page's ``from`` and ``to`` (either may be absent).

    Raises:
        ApiError: 400 for a value that is no ISO 8601 date or time, or an empty span.
    """
    start = parse_time(params.get("from"), end=False)
    end = parse_time(params.get("to"), end=True)
    if start is not None and end is not None:
        check_order(start, end)
    return start, end


def check_order(start: datetime, end: datetime) -> None:
    """Raises: ApiError 400 unless ``start`` is before ``end``."""
    if start >= end:
        raise ApiError(400, f"'from' ({start.isoformat()}) must be before 'to' ({end.isoformat()})")


def days_between(first: date, last: date, with_data: Sequence[str]) -> list[str]:
    """Every day from ``first`` to ``last``, or only ``with_data`` when that is too many."""
    if (last - first).days >= MAX_CONTIGUOUS_DAYS:
        return sorted(set(with_data))
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def device_page(session: Session, device_id: str, params: Mapping[str, str]) -> dict[str, Any]:
    """Everything the Device page shows (its JSON twin).

    Raises:
        ApiError: 404 for an unknown device; 400 for a bad span.
    """
    start, end = span_of(params)
    history = device_history.build(device_history.load(session, device_id))
    events, more = device_events.list_events(
        session, device_id, start=start, end=end, cursor=None, limit=EVENTS_SHOWN
    )
    shown = [device_events.public(e).model_dump(mode="json") for e in events]
    return {
        "device": history.model_dump(mode="json"),
        "span": {
            "from": None if start is None else start.isoformat(),
            "to": None if end is None else end.isoformat(),
        },
        "events": shown,
        "more_events": more is not None,
        "charts": {"events": events_chart(shown, start, end)},
    }


def events_chart(
    events: Sequence[Mapping[str, Any]], start: datetime | None, end: datetime | None
) -> dict[str, Any]:
    """Per UTC day, the device's installs by outcome, reverts and switches."""
    counts: Counter[tuple[str, str, str | None]] = Counter()
    for e in events:
        day = charts.utc(datetime.fromisoformat(e["at"])).date().isoformat()
        counts[(day, e["kind"], e["outcome"])] += 1
    with_data = sorted({day for day, _, _ in counts})
    if with_data:
        first = date.fromisoformat(with_data[0])
        last = date.fromisoformat(with_data[-1])
        if start is not None:
            first = min(first, charts.utc(start).date())
        if end is not None:
            last = max(last, charts.utc(end - timedelta(microseconds=1)).date())
        days = days_between(first, last, with_data)
    else:
        days = []

    def count(kind: str, outcomes: tuple[str, ...] | None) -> Any:
        return lambda day: sum(
            n
            for (d, k, o), n in counts.items()
            if d == day and k == kind and (outcomes is None or o in outcomes)
        )

    return charts.by_day(
        "events",
        "Installs, self-test failures and reverts per day (UTC)",
        days,
        [(label, count(kind, outcomes)) for label, kind, outcomes in EVENT_SERIES],
        y_label="events",
    )
