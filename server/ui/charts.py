"""Chart specifications: what a page embeds as JSON for uPlot to draw and prints as a table.

A spec's ``data`` is uPlot's own form (x values first, then one list per series, None for a gap),
so the drawn series and the table are the same numbers by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time
from typing import Any

Value = float | int | None


class Withheld:
    """A figure withheld from this viewer (too few devices): a gap in the chart, and the reason
    in its table."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


Cell = Value | Withheld


def day_x(day: str) -> int:
    """The x value of an event-time day: its start, in Unix seconds (UTC)."""
    return int(datetime.combine(date.fromisoformat(day), time(), UTC).timestamp())


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC (SQLite hands datetimes back naive; they were written in UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def time_x(moment: datetime) -> float:
    return utc(moment).timestamp()


def chart(
    chart_id: str,
    title: str,
    *,
    x: Sequence[float | int],
    x_text: Sequence[str],
    series: Sequence[tuple[str, Sequence[Cell]]],
    y_label: str,
    x_label: str = "day (UTC)",
    x_unit: str = "day",
) -> dict[str, Any]:
    """One chart: ``series`` are (label, values) with one value per ``x``; ``x_unit`` is
    ``day`` (x values are UTC midnights) or ``time``."""
    for label, values in series:
        if len(values) != len(x):
            raise ValueError(
                f"{chart_id}: series {label!r} has {len(values)} values for {len(x)} x"
            )
    withheld = [[v.reason if isinstance(v, Withheld) else None for v in s] for _, s in series]
    return {
        "id": chart_id,
        "title": title,
        "x_unit": x_unit,
        "x_label": x_label,
        "y_label": y_label,
        "x_text": list(x_text),
        "labels": [label for label, _ in series],
        "data": [list(x), *[[_finite(v) for v in values] for _, values in series]],
        "withheld": withheld if any(r for s in withheld for r in s) else None,
    }


def _finite(value: Cell) -> Value:
    """A value a chart can draw and JSON can carry (NaN, infinities and withheld figures become
    gaps)."""
    if isinstance(value, Withheld) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def by_day(
    chart_id: str,
    title: str,
    days: Sequence[str],
    series: Sequence[tuple[str, Callable[[str], Cell]]],
    *,
    y_label: str,
) -> dict[str, Any]:
    """A chart over event-time ``days``, each series a function of the day."""
    return chart(
        chart_id,
        title,
        x=[day_x(d) for d in days],
        x_text=list(days),
        series=[(label, [value(d) for d in days]) for label, value in series],
        y_label=y_label,
    )


def dig(data: Any, *path: str | int) -> Cell:
    """``data[path[0]][path[1]]...`` of a figures answer: :class:`Withheld` when the answer is
    withheld, None where a step is missing."""
    if isinstance(data, dict) and data.get("withheld"):
        return Withheld(data["withheld"])
    for step in path:
        if data is None:
            return None
        if isinstance(step, int):
            data = data[step] if isinstance(data, list) and step < len(data) else None
        else:
            data = data.get(step) if isinstance(data, dict) else None
    if isinstance(data, bool) or not isinstance(data, int | float):
        return None
    return data
