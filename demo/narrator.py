"""The live demo's narrator: reads each rollout's decision log from the server's API as it grows
and prints one short line per decision (a hold only when its reason changes), with its figures.

It only reads. Every decision it prints was taken by whoever the log names as its actor; the
demo's end check (:func:`check_story`) looks for the evaluator there, never at what the demo did.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

EVALUATOR = "evaluator"


def figures_line(figures: dict[str, Any]) -> str:
    """The figures of a decision in one line: arms, inferences, and each judged gate."""
    parts = []
    devices, inferences = figures.get("devices") or {}, figures.get("inferences") or {}
    if devices:
        treatment = f"{devices.get('treatment')} devices/{inferences.get('treatment')} inferences"
        control = f"{devices.get('control')}/{inferences.get('control')}"
        parts.append(f"treatment {treatment}, control {control}")
    verdict = figures.get("verdict") or {}
    for gate in verdict.get("gates", []):
        if gate.get("status") in ("pass", "fail") and gate.get("estimate") is not None:
            parts.append(
                f"{gate['gate']} {gate['status']}: estimate {gate['estimate']:.4g}"
                f" [{_num(gate.get('lower'))}, {_num(gate.get('upper'))}]"
                f" threshold {gate['threshold']:.4g}"
            )
    return "; ".join(parts)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class Watched:
    rollout_id: int
    version: str
    seen: set[int] = field(default_factory=set)
    last_hold: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    state: str = "running"


class Narrator:
    """Polls ``GET /v1/rollouts/{id}`` of each watched rollout and prints new decisions."""

    def __init__(self, url: str, token: str, say: Callable[[str], None] = print) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        self.say = say
        self.watched: dict[int, Watched] = {}
        self._lock = threading.Lock()

    def watch(self, rollout_id: int, version: str) -> None:
        with self._lock:
            self.watched[rollout_id] = Watched(rollout_id, version)

    def poll(self) -> None:
        with self._lock:
            watched = list(self.watched.values())
        for w in watched:
            detail = self.http.get(f"/v1/rollouts/{w.rollout_id}", params={"limit": 100}).json()
            w.state = detail["state"]
            for decision in sorted(detail["decisions"], key=lambda d: d["id"]):
                if decision["id"] in w.seen:
                    continue
                w.seen.add(decision["id"])
                w.decisions.append(decision)
                self._narrate(w, decision)

    def _narrate(self, w: Watched, d: dict[str, Any]) -> None:
        head = f"[v{w.version} stage {d['stage']}] {d['actor']}: {d['action']}"
        if d["action"] in ("hold", "evaluate"):
            shape = re.sub(r"\d+(\.\d+)?", "#", d["reason"])  # the same wait, other counts
            if shape == w.last_hold:
                return
            w.last_hold = shape
            reason = d["reason"] if len(d["reason"]) <= 150 else d["reason"][:150] + "..."
            self.say(f"{head}: {reason}")
            return
        w.last_hold = ""
        moved = f"{d['state_before']} -> {d['state_after']}"
        self.say(f"{head} ({moved}): {d['reason']}")
        line = figures_line(d.get("figures") or {})
        if line:
            self.say(f"    figures: {line}")

    def state(self, rollout_id: int) -> str:
        return self.watched[rollout_id].state

    def status(self, rollout_id: int) -> str:
        """The rollout's state and its last decision, in a line (what a failed wait found)."""
        w = self.watched[rollout_id]
        last = w.decisions[-1] if w.decisions else None
        said = f"{last['actor']}: {last['action']}: {last['reason']}" if last else "none yet"
        return f"v{w.version} is {w.state}; its last decision: {said}"

    def close(self) -> None:
        self.http.close()


def check_story(narrator: Narrator, v2: int, v3: int) -> list[str]:
    """What is missing from the story in the decision logs (empty: it all happened).

    v2 must have been completed by the evaluator, and every stage change on the way taken by it;
    v3 must have been halted and rolled back by the evaluator on a failed gate; each with figures.
    """
    problems = []

    def by_evaluator(w: Watched, action: str, after: str) -> dict[str, Any] | None:
        for d in w.decisions:
            if d["action"] == action and d["state_after"] == after and d["actor"] == EVALUATOR:
                return d
        return None

    two, three = narrator.watched[v2], narrator.watched[v3]
    done = by_evaluator(two, "complete", "completed")
    if done is None or not (done["figures"].get("verdict") or {}).get("gates"):
        problems.append(f"v{two.version}: no completion by the evaluator with its figures")
    moves = [d for d in two.decisions if d["action"] in ("advance", "complete", "approve")]
    for d in moves:
        if d["actor"] != EVALUATOR:
            problems.append(f"v{two.version}: {d['action']} by {d['actor']}, not the evaluator")
    halted = by_evaluator(three, "halt", "rolled-back")
    verdict = (halted or {}).get("figures", {}).get("verdict") or {}
    if halted is None or not verdict.get("failed"):
        problems.append(f"v{three.version}: no halt and rollback by the evaluator on a failed gate")
    for w in (two, three):
        for d in w.decisions:
            if d["actor"] != EVALUATOR and d["action"] not in ("create", "start"):
                problems.append(f"v{w.version}: {d['action']} by {d['actor']}")
    return problems
