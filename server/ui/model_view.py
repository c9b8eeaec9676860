"""The Model and Compare pages' data: a model's versions x hardware ids, each version's field
figures per event-time day and its input drift against the manifest's reference, built by
:mod:`server.reports` (the functions behind ``GET /v1/models/{name}/versions/{v}/metrics`` and
``/drift``), so every figure here equals the API's for the same query."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlmodel import Session, col

from firmware_bundles.manifest import Manifest
from server import installed_counts, metrics, registry, reports
from server.auth import Principal
from server.errors import ApiError
from server.models import DeviceInstalled
from server.state import ServerState
from server.ui import charts

#: A day of per-day figures: the API's ``DayFigures`` as JSON.
Days = Mapping[str, Mapping[str, Any]]
QUANTILES = ("p50", "p95", "p99")
# The Model page's overview charts, a line per version: (figure, title, y axis label).
_OVERVIEW = (
    ("inferences", "Inferences per day, by version", "inferences"),
    ("error_rate", "Error rate per day, by version", "errors per inference"),
)
#: The figures of a totals row, as (column, path into the API's figures).
TOTALS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("devices reporting", ("devices_reporting",)),
    ("inferences", ("inferences",)),
    ("error rate", ("error_rate",)),
    ("self-test failure rate", ("selftest_failure_rate",)),
    ("latency p50 (s)", ("latency_s", "p50")),
    ("latency p95 (s)", ("latency_s", "p95")),
    ("latency p99 (s)", ("latency_s", "p99")),
    ("accuracy", ("accuracy", "value")),
    ("labels", ("accuracy", "labels")),
    ("completeness", ("completeness", "ratio")),
)


def query(params: Mapping[str, str], name: str) -> str | None:
    """A query parameter, None when absent or empty."""
    return params.get(name) or None


def totals_rows(labelled: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """A totals table's rows: per label, the figures of :data:`TOTALS` or why they are withheld."""
    return [
        {
            "label": label,
            "withheld": figures.get("withheld"),
            "values": {
                column: None if figures.get("withheld") else charts.dig(figures, *path)
                for column, path in TOTALS
            },
        }
        for label, figures in labelled
    ]


def _versions_for(model: dict[str, Any], hardware_id: str | None) -> list[str]:
    """The model's versions (newest first) with a bundle for ``hardware_id`` (any, if None)."""
    return [
        v["version"]
        for v in model["versions"]
        if hardware_id is None or any(b["target_id"] == hardware_id for b in v["bundles"])
    ]


def _require_version(model: dict[str, Any], version: str) -> None:
    if all(v["version"] != version for v in model["versions"]):
        raise ApiError(404, f"no version {version} of model {model['name']}")


def _running(session: Session, model: str) -> Counter[tuple[str, str]]:
    """Devices running each (version, hardware id) of ``model``, as they last reported (from
    ``device_installed``, which mirrors each device's reported models)."""
    found: Counter[tuple[str, str]] = Counter()
    rows = installed_counts.active(
        session,
        [col(DeviceInstalled.version), col(DeviceInstalled.hardware_id)],
        col(DeviceInstalled.model) == model,
    )
    for (version, hardware_id), n in rows.items():
        if version:
            found[(version, hardware_id)] += n
    return found


def _matrix(session: Session, model: dict[str, Any]) -> dict[str, Any]:
    running = _running(session, model["name"])
    hardware_ids = sorted({b["target_id"] for v in model["versions"] for b in v["bundles"]})
    rows = []
    for v in model["versions"]:
        bundles = {b["target_id"]: b for b in v["bundles"]}
        rows.append(
            {
                "version": v["version"],
                "release_counter": v["release_counter"],
                "published_at": v["published_at"],
                "withdrawn": v["withdrawn"],
                "cells": {
                    h: {
                        "bundle_sha256": bundles[h]["sha256"] if h in bundles else None,
                        "released": h in v["released_for"],
                        "devices": running.get((v["version"], h), 0),
                    }
                    for h in hardware_ids
                },
            }
        )
    return {"hardware_ids": hardware_ids, "rows": rows}


def _span(state: ServerState, name: str, version: str, params: Mapping[str, str]) -> metrics.Span:
    return reports.span(
        state.catalogue,
        name,
        version,
        query(params, "hardware_id"),
        query(params, "from"),
        query(params, "to"),
        now=datetime.now(UTC),
    )


def _with_version(span: metrics.Span, version: str) -> metrics.Span:
    return metrics.Span(span.model, version, span.hardware_id, span.start, span.end)


def model_page(
    session: Session, state: ServerState, who: Principal, name: str, params: Mapping[str, str]
) -> dict[str, Any]:
    """Everything the Model page shows (its JSON twin).

    Raises:
        ApiError: 404 for an unknown model or version; 400 for a bad span or hardware id.
    """
    model = registry.get_model(session, name)
    focus = query(params, "version")
    if focus is not None:
        _require_version(model, focus)
    span = _span(state, name, focus or model["versions"][0]["version"], params)
    shown = _versions_for(model, span.hardware_id)
    focus = focus or (shown[0] if shown else None)
    settings = state.settings
    # Each version's span is read once: its metrics, and (the focus) its drift in total and per day.
    collected = {
        v: metrics.collect(session, _with_version(span, v), settings.telemetry_relative_accuracy)
        for v in shown
    }
    per_version = {
        v: reports.version_metrics(
            session, settings, _with_version(span, v), who, by_day=True, found=collected[v]
        ).model_dump(mode="json")
        for v in shown
    }
    days = sorted({d["day"] for m in per_version.values() for d in m["days"]})
    by_version = {v: {d["day"]: d for d in m["days"]} for v, m in per_version.items()}
    page: dict[str, Any] = {
        "model": name,
        "span": reports.span_public(span).model_dump(mode="json"),
        "hardware_id": span.hardware_id,
        "min_devices_shown": settings.min_devices_shown,
        "versions": model["versions"],
        "matrix": _matrix(session, model),
        "metrics": per_version,
        "focus": focus,
        "totals": totals_rows([(v, per_version[v]["total"]) for v in shown]),
        "drift": None,
        "drift_days": [],
        "drift_features": [],
        "charts": {
            "overview": [
                charts.by_day(
                    figure,
                    title,
                    days,
                    [(v, _day_value(by_version[v], figure)) for v in shown],
                    y_label=y_label,
                )
                for figure, title, y_label in _OVERVIEW
            ],
            "version": [],
            "drift": [],
        },
    }
    if focus is None or focus not in per_version:
        return page
    focus_days = sorted(by_version[focus])
    page["charts"]["version"] = detail_charts([(focus, by_version[focus])], focus_days)
    focus_span = _with_version(span, focus)
    found = collected[focus]
    page["drift"] = reports.version_drift(
        session, settings, focus_span, who, "reference", found=found
    ).model_dump(mode="json")
    manifest = metrics.reference(session, focus_span)
    page["drift_days"] = [
        {"day": day, **_day_drift(state, who, manifest, focus_span, day, found.days[day])}
        for day in focus_days
    ]
    page["drift_features"] = sorted({n for d in page["drift_days"] for n in d["psi"]})
    page["charts"]["drift"] = [_psi_chart(page["drift_days"])]
    return page


def _day_drift(
    state: ServerState,
    who: Principal,
    manifest: Manifest,
    span: metrics.Span,
    day: str,
    group: metrics.Group,
) -> dict[str, Any]:
    """Drift against the reference over one event-time day (cut to the span): the API's answer
    for that one-day span (``/drift?from=..&to=..``), from the day's group of the span's data."""
    begins = datetime.combine(datetime.fromisoformat(day).date(), time(), UTC)
    one_day = metrics.Span(
        span.model,
        span.version,
        span.hardware_id,
        max(begins, span.start),
        min(begins + timedelta(days=1), span.end),
    )
    drift = reports.day_drift(state.settings, manifest, group, who).model_dump(mode="json")
    return {
        "from": one_day.start.isoformat(),
        "to": one_day.end.isoformat(),
        "withheld": drift["withheld"],
        "psi": {
            f"{side[:-1]} {row['name']}": row["psi"]
            for side in ("inputs", "outputs")
            for row in drift[side] or []
        },
    }


def _psi_chart(drift_days: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names = sorted({n for d in drift_days for n in d["psi"]})
    days = [d["day"] for d in drift_days]
    return charts.chart(
        "drift_psi",
        "Drift against the manifest's reference: PSI per feature and output, per day",
        x=[charts.day_x(day) for day in days],
        x_text=days,
        series=[
            (
                name,
                [
                    charts.Withheld(d["withheld"]) if d["withheld"] else d["psi"].get(name)
                    for d in drift_days
                ],
            )
            for name in names
        ],
        y_label="PSI",
    )


def _day_value(days: Days, *path: str | int) -> Any:
    return lambda day: charts.dig(days.get(day), *path)


def detail_charts(
    sides: Sequence[tuple[str, Days]], days: Sequence[str], prefix: str = ""
) -> list[dict[str, Any]]:
    """A version's (or several sides') charts per day: rates, latency quantiles, output
    distribution, feedback rates and accuracy; series are labelled by side when there are two."""

    def label(what: str, side: str) -> str:
        return f"{what} · {side}" if len(sides) > 1 else what

    def per_side(*what: tuple[str, tuple[str | int, ...]]) -> list[tuple[str, Any]]:
        return [(label(w, s), _day_value(d, *path)) for s, d in sides for w, path in what]

    result = []
    if len(sides) > 1:
        result.append(
            charts.by_day(
                f"{prefix}inferences",
                "Inferences per day",
                days,
                per_side(("inferences", ("inferences",))),
                y_label="inferences",
            )
        )
    result.append(
        charts.by_day(
            f"{prefix}rates",
            "Error and self-test failure rates per day",
            days,
            per_side(
                ("error rate", ("error_rate",)),
                ("self-test failure rate", ("selftest_failure_rate",)),
            ),
            y_label="rate",
        )
    )
    result.append(
        charts.by_day(
            f"{prefix}latency",
            "Latency quantiles per day",
            days,
            per_side(*((q, ("latency_s", q)) for q in QUANTILES)),
            y_label="seconds",
        )
    )
    outputs = _output_bins(sides)
    for index, (name, bins) in enumerate(outputs):
        series = []
        for side, side_days in sides:
            for i, bin_name in enumerate(bins):
                series.append(
                    (label(f"{name}={bin_name}", side), _output_share(side_days, name, i))
                )
        result.append(
            charts.by_day(
                f"{prefix}outputs{index}",
                f"Output distribution per day: {name} (share of inferences)",
                days,
                series,
                y_label="share",
            )
        )
    kinds = sorted({k for _, d in sides for day in d.values() for k in day.get("feedback") or {}})
    if kinds:
        result.append(
            charts.by_day(
                f"{prefix}feedback",
                "Feedback rates per day (per inference)",
                days,
                per_side(*((k, ("feedback", k, "rate")) for k in kinds)),
                y_label="per inference",
            )
        )
    result.append(
        charts.by_day(
            f"{prefix}accuracy",
            "Accuracy per event-time day (labels arrive later; older days fill in)",
            days,
            per_side(("accuracy", ("accuracy", "value"))),
            y_label="accuracy",
        )
    )
    return result


def _output_bins(sides: Sequence[tuple[str, Days]]) -> list[tuple[str, list[str]]]:
    """Each output's name and bin names, from the first day that shows them."""
    found: dict[str, list[str]] = {}
    for _, days in sides:
        for day in days.values():
            for output in day.get("outputs") or []:
                if output["name"] not in found:
                    bins = output["bins"] or [f"bin {i}" for i in range(len(output["counts"]))]
                    found[output["name"]] = bins
    return sorted(found.items())


def _output_share(days: Days, name: str, index: int) -> Any:
    def value(day: str) -> Any:
        figures = days.get(day) or {}
        if figures.get("withheld"):
            return charts.Withheld(figures["withheld"])
        for output in figures.get("outputs") or []:
            if output["name"] == name:
                return charts.dig(output, "proportions", index)
        return None

    return value


def compare_page(
    session: Session, state: ServerState, who: Principal, name: str, params: Mapping[str, str]
) -> dict[str, Any]:
    """Two versions side by side on the same charts, and B's drift against A (JSON twin).

    Raises:
        ApiError: 400 without both versions or for a bad span; 404 for an unknown model or version.
    """
    model = registry.get_model(session, name)
    a, b = query(params, "a"), query(params, "b")
    if a is None or b is None:
        raise ApiError(400, "compare needs two versions: ?a=VERSION&b=VERSION")
    for version in (a, b):
        _require_version(model, version)
    span = _span(state, name, a, params)
    settings = state.settings
    sides = {
        v: reports.version_metrics(
            session, settings, _with_version(span, v), who, by_day=True
        ).model_dump(mode="json")
        for v in (a, b)
    }
    days = sorted({d["day"] for m in sides.values() for d in m["days"]})
    by_day = [(v, {d["day"]: d for d in sides[v]["days"]}) for v in (a, b)]
    return {
        "model": name,
        "a": a,
        "b": b,
        "span": reports.span_public(span).model_dump(mode="json"),
        "hardware_id": span.hardware_id,
        "min_devices_shown": settings.min_devices_shown,
        "metrics": sides,
        "totals": totals_rows([(v, sides[v]["total"]) for v in (a, b)]),
        "drift_b_against_a": reports.version_drift(
            session, settings, _with_version(span, b), who, a
        ).model_dump(mode="json"),
        "charts": detail_charts(by_day, days) if a != b else detail_charts(by_day[:1], days),
    }
