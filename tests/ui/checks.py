"""What the browser tests compare: a drawn chart against figures from the API, and its table
against the same figures (computed here from the API's answers, not with the dashboard's code)."""

from __future__ import annotations

import calendar
from datetime import date, datetime
from typing import Any

from server.ui.pages import MISSING
from tests.ui.fleet import Visitor

#: A series label's figure -> its path in the API's per-day figures.
PATHS: dict[str, tuple[str | int, ...]] = {
    "inferences": ("inferences",),
    "error rate": ("error_rate",),
    "self-test failure rate": ("selftest_failure_rate",),
    "p50": ("latency_s", "p50"),
    "p95": ("latency_s", "p95"),
    "p99": ("latency_s", "p99"),
    "accuracy": ("accuracy", "value"),
    "thumbs_down": ("feedback", "thumbs_down", "rate"),
    "label=rest": ("outputs", 0, "proportions", 0),
    "label=move": ("outputs", 0, "proportions", 1),
    "label=(unseen)": ("outputs", 0, "proportions", 2),
}


def day_x(day: str) -> int:
    return calendar.timegm(date.fromisoformat(day).timetuple())


def at_x(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


def figure(day: dict[str, Any] | None, path: tuple[str | int, ...]) -> Any:
    """A figure of an API answer, None when withheld or absent."""
    if day is None or day.get("withheld"):
        return None
    value: Any = day
    for step in path:
        if value is None:
            return None
        value = value[step] if isinstance(step, int) else value.get(step)
    return value


def series_of(drawn: dict[str, Any]) -> dict[str, list[Any]]:
    """A drawn chart's series by label (uPlot's ``data`` without the x values)."""
    return dict(zip(drawn["labels"][1:], drawn["data"][1:], strict=True))


def assert_drawn(drawn: dict[str, Any], xs: list[float], expected: dict[str, list[Any]]) -> None:
    """The chart's x values are ``xs`` and each series equals ``expected[label]``, exactly."""
    assert drawn["data"][0] == xs
    series = series_of(drawn)
    assert set(series) == set(expected), (sorted(series), sorted(expected))
    for label, values in series.items():
        assert values == expected[label], label


def in_drawn_order(drawn: dict[str, Any], expected: dict[str, list[Any]]) -> list[list[Any]]:
    """``expected``'s series in the order the chart (and its table) has them."""
    return [expected[label] for label in drawn["labels"][1:]]


def table(visitor: Visitor, chart_id: str) -> list[list[str]]:
    """The chart's table: per row, the text of each cell (the x first)."""
    rows: list[list[str]] = visitor.page.eval_on_selector_all(
        f'table[data-table="{chart_id}"] tbody tr',
        "rows => rows.map(r => Array.from(r.children).map(c => c.textContent.trim()))",
    )
    return rows


def assert_table(
    rows: list[list[str]],
    x_text: list[str],
    columns: list[list[Any]],
    *,
    withheld: str = "too few devices",
) -> None:
    """Each row starts with its x and shows each column's value to 4 significant digits
    (integers whole); a missing value shows a dash, a withheld one ``withheld``."""
    assert [r[0] for r in rows] == x_text
    for i, row in enumerate(rows):
        assert len(row) == len(columns) + 1
        for cell, column in zip(row[1:], columns, strict=True):
            value = column[i]
            if value is None:
                assert cell in (MISSING, withheld), cell
            elif isinstance(value, int):
                assert cell == str(value)
            else:
                assert float(cell) == approx_4(value), (cell, value)


def approx_4(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=5e-4, abs=1e-12)


def chart_pixels(visitor: Visitor, chart_id: str) -> str:
    """The chart's canvas as a PNG data URL."""
    data_url: str = visitor.page.eval_on_selector(
        f"#{chart_id}-plot canvas", "canvas => canvas.toDataURL('image/png')"
    )
    return data_url
