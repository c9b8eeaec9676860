"""``edgefleet rollout``: staged rollouts gated on field behaviour against a control arm."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.api import Api, api_command
from edgefleet.common import console, literal

rollout_app = typer.Typer(
    help="Staged rollouts: a version to cohorts in stages, gated on its field behaviour against"
    " the devices still on the previous version, halted or taken back when it does worse.",
    no_args_is_help=True,
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
IdArg = Annotated[int, typer.Argument(help="Rollout id.")]


def parse_duration(text: str) -> int:
    """``3d``, ``12h``, ``30m``, ``45s`` or plain seconds, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise typer.BadParameter(f"{text!r}: a duration like 3d, 12h, 30m, 45s or seconds")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "s"])


def _stages(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: percentages separated by commas, e.g. 5,25,100"
        ) from None


def _summary(r: dict[str, Any]) -> str:
    return (
        f"rollout {r['id']}: {literal(r['model'])} {literal(r['version'])} {r['state']},"
        f" stage {r['stage']} of {len(r['stages'])} ({r['percent']:g}%)"
    )


@rollout_app.command("create")
@api_command
def create(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to roll out.")],
    stages: Annotated[
        str, typer.Option(help="Treatment share per stage, in percent, ending at 100.")
    ] = "5,25,100",
    cohort: Annotated[
        list[str] | None, typer.Option("--cohort", help="Only devices of this cohort (repeat).")
    ] = None,
    hardware_id: Annotated[
        list[str] | None,
        typer.Option(
            "--hardware-id",
            help="Only this hardware id (repeat; default: every one the version has a bundle for).",
        ),
    ] = None,
    firmware_min: Annotated[str, typer.Option(help="Lowest firmware selected.")] = "0.0.0",
    firmware_below: Annotated[
        str | None, typer.Option(help="Firmware from this version on is not selected.")
    ] = None,
    min_duration: Annotated[
        str, typer.Option(help="Minimum duration of each stage (3d, 12h, 30m, 45s).")
    ] = "3d",
    min_devices: Annotated[int, typer.Option(help="Devices reporting in each arm.")] = 3,
    min_inferences: Annotated[int, typer.Option(help="Inferences in each arm.")] = 1000,
    approval: Annotated[
        bool, typer.Option("--approval", help="Every stage waits for an operator to approve.")
    ] = False,
    on_failure: Annotated[
        str, typer.Option(help="halt (devices keep what they run) or rollback.")
    ] = "rollback",
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", help="A gate setting KEY=VALUE, e.g. alpha=0.05 (repeat)."),
    ] = None,
    draft: Annotated[bool, typer.Option("--draft", help="Create without starting.")] = False,
    shadow: Annotated[
        float | None,
        typer.Option(
            "--shadow",
            help="Run the version in shadow beside the released one on this share of the"
            " calls (0-1) instead of replacing it (docs/rollouts.md).",
        ),
    ] = None,
    *,
    api: Api,
) -> None:
    """Create a rollout; it starts at once unless --draft. With no gate flags the default
    gates judge errors, self-test and install failures, latency, outputs, inputs, negative
    feedback and accuracy against the control arm."""
    if on_failure not in ("halt", "rollback"):
        raise typer.BadParameter("--on-failure is halt or rollback")
    seconds = parse_duration(min_duration)
    gates: dict[str, Any] = {}
    for setting in gate or []:
        key, sep, value = setting.partition("=")
        if not sep:
            raise typer.BadParameter(f"--gate {setting!r}: KEY=VALUE")
        gates[key.strip()] = _value(value.strip())
    plan = {
        "model": name,
        "version": version,
        "selector": {
            "cohorts": cohort or [],
            "hardware_ids": hardware_id or [],
            "firmware_min": firmware_min,
            "firmware_below": firmware_below,
        },
        "stages": [
            {
                "percent": p,
                "min_duration_s": seconds,
                "min_devices": min_devices,
                "min_inferences": min_inferences,
                "approval": approval,
            }
            for p in _stages(stages)
        ],
        "gates": gates,
        "on_failure": on_failure,
        "draft": draft,
    }
    if shadow is not None:
        plan["shadow"] = {"sample_fraction": shadow}
    answer = api.call("POST", "/v1/rollouts", json=plan)
    api.say(answer, _summary(answer))


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@rollout_app.command("list")
@api_command
def list_(
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    state: Annotated[str | None, typer.Option(help="Only rollouts in this state.")] = None,
    *,
    api: Api,
) -> None:
    """Rollouts, newest first."""
    params = {k: v for k, v in {"model": model, "state": state}.items() if v}
    answer = api.call("GET", "/v1/rollouts", params=params)
    if api.printed_json(answer):
        return
    table = Table("id", "model", "version", "state", "stage", "percent", "hardware ids")
    for r in answer:
        table.add_row(
            str(r["id"]),
            literal(r["model"]),
            literal(r["version"]),
            r["state"],
            f"{r['stage']}/{len(r['stages'])}",
            f"{r['percent']:g}%",
            literal(", ".join(r["selector"]["hardware_ids"])),
        )
    console.print(table)


@rollout_app.command("status")
@api_command
def status(
    rollout_id: IdArg,
    limit: Annotated[int, typer.Option(help="Decisions shown.")] = 10,
    *,
    api: Api,
) -> None:
    """State, stage, arms with device counts and the newest decisions with their figures."""
    r = api.call("GET", f"/v1/rollouts/{rollout_id}", params={"limit": limit})
    if api.printed_json(r):
        return
    console.print(_summary(r))
    arms = r["arms"]
    console.print(
        f"selected {arms['selected']} devices: treatment {arms['treatment']},"
        f" control {arms['control']} (on {literal(r['previous'])})"
    )
    table = Table("at", "actor", "action", "stage", "state", "reason")
    for d in r["decisions"]:
        table.add_row(
            d["at"][:19],
            literal(d["actor"]),
            d["action"],
            str(d["stage"]),
            f"{d['state_before']} -> {d['state_after']}",
            literal(d["reason"]),
        )
    console.print(table)


@rollout_app.command("evaluate")
@api_command
def evaluate(
    rollout_id: IdArg,
    *,
    api: Api,
) -> None:
    """Run the server's evaluator on the rollout now and print its decision."""
    d = api.call("POST", f"/v1/rollouts/{rollout_id}/evaluate")
    api.say(d, f"{d['action']}: {literal(d['reason'])} ({d['state_before']} -> {d['state_after']})")


def _action(action: str, doc: str) -> None:
    def command(
        rollout_id: IdArg,
        *,
        api: Api,
    ) -> None:
        answer = api.call("POST", f"/v1/rollouts/{rollout_id}/{action}")
        api.say(answer, _summary(answer))

    command.__doc__ = doc
    rollout_app.command(action)(api_command(command))


for _name, _doc in (
    ("start", "Start a draft rollout at its first stage."),
    ("pause", "Pause: devices keep their arms; the evaluator judges but does not move it."),
    ("resume", "Resume a paused rollout."),
    ("approve", "Approve a rollout waiting for a person: it moves to its next stage."),
    ("abort", "Stop the rollout where it is (halted: nothing new is offered)."),
    ("rollback", "Take the treatment devices back to the previous version."),
    ("confirm", "Confirm the version for the rollout's devices (their rollback floor may rise)."),
):
    _action(_name, _doc)
