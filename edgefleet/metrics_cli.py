"""``edgefleet metrics`` and ``edgefleet drift``: how a model version does in the field."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.api import Api, api_command
from edgefleet.common import console, literal

HardwareOpt = Annotated[
    str | None, typer.Option("--hardware-id", help="Only this hardware id (catalogue target).")
]
FromOpt = Annotated[
    str | None,
    typer.Option("--from", help="ISO 8601 date or time, UTC (default: 7 days before --to)."),
]
ToOpt = Annotated[
    str | None,
    typer.Option("--to", help="ISO 8601 date (through that day) or time, UTC (default: now)."),
]


def _figures(
    api: Api,
    what: str,
    name: str,
    version: str,
    hardware_id: str | None,
    start: str | None,
    end: str | None,
    **more: str,
) -> Any:
    """The server's ``what`` (metrics, drift) of a version over a span, for one hardware id or
    all."""
    given = {"hardware_id": hardware_id, "from": start, "to": end, **more}
    params = {k: v for k, v in given.items() if v is not None}
    return api.call("GET", f"/v1/models/{name}/versions/{version}/{what}", params=params)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _count_and_rate(figures: dict[str, Any], name: str) -> str:
    """A count with its rate beside it: ``figures[name]`` and ``figures[name + "_rate"]``."""
    return f"{figures[name]:,} ({_pct(figures[name + '_rate'])})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.3f}"


def _row(label: str, f: dict[str, Any]) -> list[str]:
    if f.get("withheld"):
        return [label, literal(f["withheld"]), *[""] * 8]
    latency = f["latency_s"]
    accuracy = f["accuracy"]
    return [
        label,
        str(f["devices_reporting"]),
        f"{f['inferences']:,}",
        _pct(f["error_rate"]),
        _pct(f["selftest_failure_rate"]),
        _ms(latency["p50"]),
        _ms(latency["p95"]),
        _ms(latency["p99"]),
        f"{_pct(accuracy['value'])} ({accuracy['labels']:,})",
        _pct(f["completeness"]["ratio"]),
    ]


@api_command
def metrics_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    hardware_id: HardwareOpt = None,
    start: FromOpt = None,
    end: ToOpt = None,
    *,
    api: Api,
) -> None:
    """A version's field figures per event-time day and in total: devices reporting,
    inferences, error and self-test failure rates, latency quantiles, accuracy from labels
    (with the number of labels it rests on) and telemetry completeness.

    Groups of fewer devices than the server's minimum show "too few devices" to viewers.
    """
    answer = _figures(api, "metrics", name, version, hardware_id, start, end)
    if api.printed_json(answer):
        return
    span = answer["span"]
    table = Table(
        "day",
        "devices",
        "inferences",
        "errors",
        "self-test fail",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "accuracy (labels)",
        "complete",
        title=f"{literal(name)} {literal(version)} on {literal(span['hardware_id'] or 'all')}"
        f" from {span['start']} to {span['end']}",
    )
    table.columns[0].no_wrap = True
    for day in answer["days"]:
        table.add_row(*_row(day["day"], day))
    table.add_row(*_row("total", answer["total"]), style="bold")
    console.print(table)
    _print_shadow_and_quality(answer["total"])
    if answer["skipped_rows"]:
        console.print(f"{answer['skipped_rows']} stored rows failed their checks and were left out")


def _print_shadow_and_quality(total: dict[str, Any]) -> None:
    """The span's shadow agreement per candidate, and its inputs' data-quality problems."""
    if total.get("withheld"):
        return
    shadow = total.get("shadow") or []
    if shadow:
        table = Table(
            "candidate", "sampled", "compared", "agreed", "agreement", "dropped", "errors",
            "p95 ms", title="shadow candidates beside this version",
        )  # fmt: skip
        for r in shadow:
            table.add_row(
                literal(r["candidate_version"]),
                f"{r['sampled']:,}",
                f"{r['compared']:,}",
                f"{r['agreed']:,}",
                _pct(r["agreement"]),
                f"{r['dropped']:,}",
                f"{r['errors']:,}",
                _ms(r["latency_s"]["p95"]),
            )
        console.print(table)
    quality = total.get("data_quality") or {}
    rows = [
        f for f in quality.get("features", []) if f["missing"] or f["out_of_range"] or f["unseen"]
    ]
    if rows or quality.get("refused_total"):
        table = Table("input", "values", "missing", "out of range", "unseen", title="data quality")
        for f in rows:
            table.add_row(
                literal(f["name"]),
                f"{f['values']:,}",
                *(_count_and_rate(f, problem) for problem in ("missing", "out_of_range", "unseen")),
            )
        console.print(table)
        for name, count in sorted((quality.get("refused") or {}).items()):
            console.print(f"refused by the schema check: {count:,} calls naming {literal(name)}")


_DRIFT_FIGURES = ("psi", "js_divergence_bits", "chi2_p_value", "max_abs_proportion_diff")


@api_command
def drift_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    against: Annotated[
        str,
        typer.Option(
            "--against", help="'reference' (the manifest's histograms) or another version."
        ),
    ] = "reference",
    hardware_id: HardwareOpt = None,
    start: FromOpt = None,
    end: ToOpt = None,
    *,
    api: Api,
) -> None:
    """Drift of each input feature and output against the manifest's reference histograms or
    another version over the same span: PSI, Jensen-Shannon divergence (bits), the chi-square
    test's p-value and the largest difference of bin proportions, from counts on the
    manifest's bins (under/overflow and unseen included)."""
    answer = _figures(api, "drift", name, version, hardware_id, start, end, against=against)
    if api.printed_json(answer):
        return
    drift = answer["drift"]
    if drift.get("withheld"):
        console.print(literal(drift["withheld"]))
        return
    table = Table(
        "",
        "name",
        "status",
        "count",
        "PSI",
        "JS bits",
        "chi2 p",
        "max diff",
        title=f"{literal(name)} {literal(version)} against {literal(against)}"
        f" ({drift['devices_reporting']} devices)",
    )
    table.columns[1].no_wrap = True
    for side in ("inputs", "outputs"):
        for row in drift[side]:
            table.add_row(
                side[:-1],
                literal(row["name"]),
                row["status"],
                f"{row['current_count']:,}",
                *(
                    "-" if row[k] is None else f"{row[k]:.4g}"
                    for k in (
                        "psi",
                        "js_divergence_bits",
                        "chi2_p_value",
                        "max_abs_proportion_diff",
                    )
                ),
            )
    console.print(table)
    console.print(
        f"PSI replaces a zero proportion by {answer['psi_zero_proportion']:g}; {answer['method']}"
    )
