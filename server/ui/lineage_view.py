"""The Lineage page's data: ``GET /v1/models/{name}/versions/{version}/lineage``'s answer (the
same function), with its devices per day and field figures as the page's charts and tables."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlmodel import Session

from server import lineage, registry, reports
from server.auth import Principal
from server.errors import ApiError
from server.state import ServerState
from server.ui import charts
from server.ui.device_view import days_between
from server.ui.model_view import totals_rows


def lineage_page(
    session: Session, state: ServerState, who: Principal, name: str, version: str
) -> dict[str, Any]:
    """Everything the Lineage page shows (its JSON twin).

    Raises:
        ApiError: 404 for an unknown model or version.
    """
    settings = state.settings
    try:
        found = lineage.lineage(
            session,
            name,
            version,
            root=state.trusted.root,
            relative_accuracy=settings.telemetry_relative_accuracy,
            min_devices=settings.min_devices_shown,
            privileged=reports.privileged(who),
            now=datetime.now(UTC),
        )
    except ApiError as exc:
        if exc.status == 404:
            registry.get_model(session, name)  # an unknown model says so
        raise
    answer = found.model_dump(mode="json")
    per_day = {d["day"]: d for d in answer["devices_per_day"]}
    days = (
        days_between(
            date.fromisoformat(min(per_day)), date.fromisoformat(max(per_day)), list(per_day)
        )
        if per_day
        else []
    )

    def on(field: str) -> Any:
        return lambda day: per_day[day][field] if day in per_day else 0

    return {
        "lineage": answer,
        "totals": totals_rows([(version, answer["field"]["total"])]),
        "charts": {
            figure: charts.by_day(figure, title, days, [(figure, on(figure))], y_label=figure)
            for figure, title in (
                (
                    "devices",
                    f"Devices that ran {version} per event-time day (uploaded telemetry of it)",
                ),
                ("inferences", f"Inferences of {version} per event-time day"),
            )
        },
    }
