"""The Rollout page's data (``GET /v1/rollouts/{id}``'s answer, each gate's figure against its
threshold over the evaluations, the controls an operator may use now) and the treatment against
control comparison, whose arms are the evaluator's own (:func:`server.evaluator.arm_members`)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlmodel import Session

from server import aggregate, evaluator, metrics, reports, rollouts
from server.auth import Principal
from server.errors import ApiError
from server.models import Rollout
from server.routes.rollouts import detail
from server.state import ServerState
from server.ui import charts
from server.ui.model_view import detail_charts, totals_rows

#: The operator's controls on the page, in the order shown.
CONTROLS = ("pause", "resume", "approve", "abort", "rollback")
#: The decision log shows this many newest decisions (the API's largest ``limit``).
DECISIONS_SHOWN = 1000
#: Per gate, what its figure is (every gate's ``estimate`` is a harm: positive is worse).
GATE_FIGURES = {
    "error_rate": "increase in error rate (treatment - control)",
    "selftest": "increase in self-test failures per window",
    "feedback": "increase in negative feedback rate",
    "accuracy": "drop in accuracy (control - treatment)",
    "latency": "relative increase in the latency quantile",
    "install": "share of treatment devices failing install or self-test",
    "output_shift": "Jensen-Shannon divergence of outputs (bits)",
    "input_drift": "largest PSI of an input",
}


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    """The rollout a URL names.

    Raises:
        ApiError: 404 when it is not a rollout id or there is no such rollout.
    """
    if not rollout_id.isdigit() or not 1 <= int(rollout_id) <= 2**31 - 1:
        raise ApiError(404, f"no rollout {rollout_id!r}: rollout ids are whole numbers from 1")
    return rollouts.get(session, int(rollout_id))


def controls(rollout: Rollout, who: Principal) -> list[str]:
    """The actions this caller may take on the rollout now (none for a viewer)."""
    if not reports.privileged(who):
        return []
    return [a for a in CONTROLS if rollout.state in rollouts.TRANSITIONS[a][0]]


def rollout_page(
    session: Session, state: ServerState, who: Principal, rollout_id: str
) -> dict[str, Any]:
    """Everything the Rollout page shows (its JSON twin).

    Raises:
        ApiError: 404 for an unknown rollout.
    """
    rollout = get_rollout(session, rollout_id)
    answer = detail(session, rollout, DECISIONS_SHOWN).model_dump(mode="json")
    return {
        "rollout": answer,
        "controls": controls(rollout, who),
        "gates": gate_history(answer["decisions"]),
        "headlines": {str(d["id"]): headline(d) for d in answer["decisions"]},
        "charts": gate_charts(answer["decisions"]),
    }


def headline(decision: dict[str, Any]) -> str:
    """A decision's reason in a line: the gates' own reasons (already in its figures, shown as a
    table beside it) replaced by which gates held, failed and passed."""
    reason: str = decision["reason"]
    verdict = decision["figures"].get("verdict") or {}
    told = verdict.get("reason")
    if not told or told not in reason or told == "every gate passed":
        return reason
    by_status: dict[str, list[str]] = defaultdict(list)
    for gate in verdict.get("gates", []):
        by_status[gate["status"]].append(gate["gate"])
    for check in verdict.get("health", []):
        if check["status"] == "fail":
            by_status["failed checks"].append(check["name"])
    words = {"fail": "failed", "hold": "holding", "failed checks": "failed checks"}
    parts = [
        f"{len(by_status[status])} {word} ({', '.join(by_status[status])})"
        for status, word in words.items()
        if by_status[status]
    ]
    if by_status["pass"]:
        parts.append(f"{len(by_status['pass'])} passed")
    return reason.replace(told, ", ".join(parts))


def gate_history(decisions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per gate, oldest first, its figures at each evaluation that judged it."""
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for decision in reversed(decisions):
        verdict = decision["figures"].get("verdict")
        for gate in (verdict or {}).get("gates", []):
            history[gate["gate"]].append({"at": decision["at"], "decision": decision["id"], **gate})
    return dict(history)


def gate_charts(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per gate: its estimate and confidence bounds against the threshold over the
    evaluations (decision times)."""
    result = []
    for gate, points in gate_history(decisions).items():
        moments = [datetime.fromisoformat(p["at"]) for p in points]
        result.append(
            charts.chart(
                f"gate_{gate}",
                f"Gate {gate}: {GATE_FIGURES.get(gate, 'figure')} against its threshold",
                x=[charts.time_x(m) for m in moments],
                x_text=[
                    f"{m:%Y-%m-%d %H:%M:%S} ({p['status']})"
                    for m, p in zip(moments, points, strict=True)
                ],
                series=[
                    (name, [p[key] for p in points])
                    for name, key in (
                        ("estimate", "estimate"),
                        ("lower bound", "lower"),
                        ("upper bound", "upper"),
                        ("threshold", "threshold"),
                    )
                ],
                y_label=gate,
                x_label="evaluation (UTC)",
                x_unit="time",
            )
        )
    return result


def rollout_compare_page(
    session: Session, state: ServerState, who: Principal, rollout_id: str
) -> dict[str, Any]:
    """The rollout's treatment arm against its control arm per event-time day, from the
    evaluator's arms and windows (since the rollout started), on the Compare page's charts.

    Raises:
        ApiError: 404 for an unknown rollout; 409 for one that has not started.
    """
    rollout = get_rollout(session, rollout_id)
    if rollout.started_at is None:
        raise ApiError(409, f"rollout {rollout.id} has not started: its arms have no data yet")
    settings = state.settings
    accuracy = settings.telemetry_relative_accuracy
    members = evaluator.arm_members(session, rollout)
    arms = {
        "treatment": (
            {d.id: members.new_version for d in members.treatment},
            None,
        ),
        "control": (
            {d.id: members.previous_versions[d.hardware_id] for d in members.control},
            members.control_until,
        ),
    }
    minimum, allowed = settings.min_devices_shown, reports.privileged(who)
    sides: dict[str, Any] = {}
    for arm, (versions, until) in arms.items():
        total = metrics.Group(aggregate.empty(accuracy))
        days: dict[str, metrics.Group] = {}
        for w in evaluator.arm_windows(
            session, rollout.model_name, versions, rollout.started_at, until, accuracy
        ):
            day = charts.utc(w.window_start).date().isoformat()
            if day not in days:
                days[day] = metrics.Group(aggregate.empty(accuracy))
            days[day].add(w.device_id, w.aggregate)
            total.add(w.device_id, w.aggregate)
        arm_versions = sorted(set(versions.values()))
        manifest = metrics.reference(
            session,
            metrics.Span(
                rollout.model_name,
                arm_versions[0] if arm_versions else members.new_version,
                None,
                rollout.started_at,
                rollout.started_at,
            ),
        )

        def figures(group: metrics.Group, m: Any = manifest) -> dict[str, Any]:
            return metrics.figures(session, group, m, min_devices=minimum, privileged=allowed)

        sides[arm] = {
            "versions": arm_versions,
            "devices": len(versions),
            "total": figures(total),
            "days": {day: {"day": day, **figures(g)} for day, g in sorted(days.items())},
        }
    all_days = sorted({d for side in sides.values() for d in side["days"]})
    labelled = [
        (f"{arm} ({', '.join(side['versions']) or 'none'})", side["days"])
        for arm, side in sides.items()
    ]
    return {
        "rollout": rollout.id,
        "model": rollout.model_name,
        "state": rollout.state,
        "stage": rollout.stage + 1,
        "since": charts.utc(rollout.started_at).isoformat(),
        "min_devices_shown": minimum,
        "arms": sides,
        "totals": totals_rows(
            [(label, sides[arm]["total"]) for arm, (label, _) in zip(sides, labelled, strict=True)]
        ),
        "charts": detail_charts(labelled, all_days),
    }
