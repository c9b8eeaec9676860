"""``edgefleet lineage``: a model version from its training data to the devices running it."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table
from rich.tree import Tree

from edgefleet.api import DEFAULT_SERVER, JsonFlag, ServerOpt, TokenOpt, call
from edgefleet.common import console, literal, print_json


def lineage_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    json_out: JsonFlag = False,
) -> None:
    """A version's lineage: training source and data hashes, the converter's variant, accuracy
    and size per target, bundle SHA-256s and HIL verdicts, releases, confirmations and rollouts
    with dates, devices running it per day, and its field figures over the last seven days."""
    path = f"/v1/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/lineage"
    answer = call(server, token, "GET", path)
    if json_out:
        print_json(answer)
        return
    console.print(lineage_tree(answer))
    if answer["devices_per_day"]:
        console.print(_days_table(answer["devices_per_day"]))


def lineage_tree(answer: dict[str, Any]) -> Tree:
    """The lineage as a tree, every value from the server escaped."""
    head = f"[bold]{literal(answer['model'])} {literal(answer['version'])}[/]"
    head += f" (release counter {answer['release_counter']})"
    head += f", published {literal(answer['published_at'])} by {literal(answer['published_by'])}"
    if answer["withdrawn"]:
        head += " [red]withdrawn[/]"
    tree = Tree(head)
    _provenance(tree.add("provenance"), answer["provenance"])
    if answer.get("mlflow"):
        links = tree.add("MLflow")
        for what, url in answer["mlflow"].items():
            if url:
                links.add(f"{what.replace('_', ' ')}: {literal(url)}")
    targets = tree.add("targets")
    for target in answer["targets"]:
        _target(targets, target)
    if not answer["targets"]:
        targets.add("none")
    releases = tree.add("releases")
    for r in answer["releases"]:
        releases.add(
            f"{literal(r['hardware_id'])} at {literal(r['released_at'])}"
            f" by {literal(r['released_by'])}"
        )
    for c in answer["confirmations"]:
        where = f" (rollout {c['rollout_id']})" if c["rollout_id"] is not None else ""
        releases.add(
            f"confirmed for {literal(c['hardware_id'])}{where} at {literal(c['confirmed_at'])}"
            f" by {literal(c['confirmed_by'])}: floor {c['release_counter']}"
        )
    if not answer["releases"] and not answer["confirmations"]:
        releases.add("not released")
    rollouts = tree.add("rollouts")
    for r in answer["rollouts"]:
        line = (
            f"#{r['id']} {literal(r['state'])}, stage {r['stage']} ({r['percent']:g}%)"
            f" on {literal(', '.join(r['hardware_ids']))}; created {literal(r['created_at'])}"
        )
        if r["started_at"]:
            line += f", started {literal(r['started_at'])}"
        if r["finished_at"]:
            line += f", finished {literal(r['finished_at'])}"
        node = rollouts.add(line)
        if r["last_action"]:
            node.add(
                f"{r['decisions']} decisions; last: {literal(r['last_action'])} at"
                f" {literal(r['last_decision_at'])}: {literal(r['last_reason'])}"
            )
    if not answer["rollouts"]:
        rollouts.add("none")
    _field(tree, answer["field"])
    return tree


def _provenance(node: Tree, provenance: dict[str, Any] | None) -> None:
    if provenance is None:
        node.add("not recorded")
        return
    node.add(f"source model sha256 {literal(provenance['source_model_sha256'])}")
    for what, sha in sorted(provenance["data_sha256"].items()):
        node.add(f"data {literal(what)} sha256 {literal(sha)}")
    tools = ", ".join(f"{k} {v}" for k, v in sorted(provenance["tool_versions"].items()))
    if tools:
        node.add(f"tools: {literal(tools)}")
    if provenance["builder"]:
        node.add(f"builder: {literal(provenance['builder'])}")


def _target(targets: Tree, target: dict[str, Any]) -> None:
    q = target["quantisation"]
    node = targets.add(
        f"[bold]{literal(target['hardware_id'])}[/]: {literal(target['format'])}"
        f" {literal(target['precision'])}, variant {literal(q['scheme'])}"
        f" ({q['quantised_ops']} ops quantised"
        + (", per channel" if q["per_channel"] else "")
        + ")"
    )
    node.add(
        f"bundle {literal(target['bundle_sha256'])}, {target['bundle_bytes']:,} bytes;"
        f" RAM estimate {target['ram_estimate_bytes']:,} bytes"
    )
    figures = ", ".join(f"{k} {v:g}" for k, v in sorted(target["metrics"].items()))
    node.add(f"measured: {literal(figures) or 'nothing'}")
    if q["calibration"]:
        c = q["calibration"]
        node.add(
            f"calibrated by {literal(c['method'])} on {c['samples']} samples"
            f" (data sha256 {literal(c['data_sha256'])})"
        )
    hil = target["hil"]
    if hil is None:
        node.add("HIL: no report")
    else:
        verdict = "[green]pass[/]" if hil["passed"] else "[red]fail[/]"
        line = f"HIL: {verdict}, {len(hil['runs'])} runs, {literal(hil['finished_at'])}"
        if not hil["signature_valid"]:
            line += f" [yellow](signature no longer verifies: {literal(hil['problem'])})[/]"
        runs = node.add(line)
        for run in hil["runs"]:
            failed = [c["name"] for c in run["checks"] if c["status"] == "fail"]
            runs.add(
                f"{literal(run['spec'])}: {'pass' if run['passed'] else 'fail'}"
                + (f" (failed: {literal(', '.join(failed))})" if failed else "")
            )
    released = ", ".join(target["released_at"])
    node.add(f"released: {literal(released) or 'never'}")


def _field(tree: Tree, field: dict[str, Any]) -> None:
    span = field["span"]
    node = tree.add(f"field, {literal(span['start'])} to {literal(span['end'])}")
    total = field["total"]
    if total.get("withheld"):
        node.add(literal(total["withheld"]))
        return
    latency = total["latency_s"]
    accuracy = total["accuracy"]["value"]
    node.add(
        f"{total['devices_reporting']} devices, {total['inferences']:,} inferences, error rate"
        f" {_pct(total['error_rate'])}, self-test failures {_pct(total['selftest_failure_rate'])}"
    )
    node.add(
        f"latency p50 {_ms(latency['p50'])} p95 {_ms(latency['p95'])} p99 {_ms(latency['p99'])}"
        f"; accuracy {_pct(accuracy)} on {total['accuracy']['labels']:,} labels"
    )


def _days_table(days: list[dict[str, Any]]) -> Table:
    table = Table("day", "devices", "inferences", title="devices running it per day")
    for day in days:
        table.add_row(literal(day["day"]), f"{day['devices']:,}", f"{day['inferences']:,}")
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.3f} ms"
