"""Each dashboard page in Chromium against a real server on a seeded fleet: it renders, every
chart draws exactly the API's figures and its table shows the same, hiding a series changes the
canvas, a viewer sees no controls and is refused an action, an operator pauses and resumes a
rollout from the page; no console errors, and no request leaves the server."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.ui.checks import (
    PATHS,
    assert_drawn,
    assert_table,
    at_x,
    chart_pixels,
    day_x,
    figure,
    in_drawn_order,
    series_of,
    table,
)
from tests.ui.fleet import MODEL, SeededFleet, Visitor, _post

DETAIL_CHARTS = ("rates", "latency", "outputs0", "feedback", "accuracy", "inferences")


def _clean(visitor: Visitor) -> None:
    assert visitor.console_errors == []
    assert visitor.foreign_requests() == []


def _query(span: dict[str, str], **more: str) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in {**span, **more}.items())


def _metrics(fleet: SeededFleet, version: str, role: str = "operator") -> dict[str, Any]:
    return fleet.api(f"/v1/models/{MODEL}/versions/{version}/metrics", role, **fleet.span)


def _by_day(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["day"]: d for d in answer["days"]}


def _assert_side_charts(
    visitor: Visitor,
    drawn: dict[str, Any],
    sides: dict[str, dict[str, dict[str, Any]]],
    chart_ids: tuple[str, ...] = DETAIL_CHARTS,
) -> int:
    """Every detail chart drawn for ``sides`` (label -> per-day API figures) equals the API's
    figures, and its table shows them; series are "figure · side" when there are two sides."""
    days = sorted({d for figures in sides.values() for d in figures})
    checked = 0
    for chart_id in chart_ids:
        if chart_id not in drawn:
            continue
        expected = {}
        for label in series_of(drawn[chart_id]):
            what, _, side = label.partition(" · ")
            side = side or next(iter(sides))
            expected[label] = [figure(sides[side].get(day), PATHS[what]) for day in days]
        assert_drawn(drawn[chart_id], [day_x(d) for d in days], expected)
        assert_table(table(visitor, chart_id), days, in_drawn_order(drawn[chart_id], expected))
        checked += 1
    return checked


def test_fleet_page_draws_the_devices_api_and_lists_what_it_holds(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto("/ui/")
    assert operator.page.inner_text("h1") == "Fleet"
    devices = fleet.api("/v1/devices")
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(13, -1, -1)]
    seen: dict[str, Counter[str]] = {}
    for d in devices:
        counts = seen.setdefault(d["hardware_id"], Counter())
        if d["last_seen"]:
            counts[d["last_seen"][:10]] += 1
    expected = {h: [c.get(day, 0) for day in days] for h, c in seen.items()}
    drawn = operator.charts()
    assert_drawn(drawn["last_seen"], [day_x(d) for d in days], expected)
    assert_table(table(operator, "last_seen"), days, in_drawn_order(drawn["last_seen"], expected))
    rows = operator.page.eval_on_selector_all(
        "#by-hardware tbody tr",
        "rows => rows.map(r => Array.from(r.children).map(c => c.textContent.trim()))",
    )
    assert {r[0]: int(r[3]) for r in rows} == dict(Counter(d["hardware_id"] for d in devices))
    never = sum(1 for d in devices if d["last_seen"] is None)
    assert f"of them {never} never checked in" in operator.page.inner_text(".summary")
    assert operator.page.locator("#silent tbody tr").count() >= 4
    assert operator.page.locator(f'a[href="/ui/rollouts/{fleet.rollout_id}"]').count() == 1
    _clean(operator)


def test_model_page_draws_the_metrics_and_drift_api_and_hiding_a_series_redraws(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/models/{MODEL}" + _query(fleet.span))
    versions = ["2.0.0", "1.1.0", "1.0.0"]
    answers = {v: _by_day(_metrics(fleet, v)) for v in versions}
    drawn = operator.charts()
    days = sorted({d for a in answers.values() for d in a})
    for chart_id, path in (("inferences", ("inferences",)), ("error_rate", ("error_rate",))):
        expected = {v: [figure(answers[v].get(d), path) for d in days] for v in versions}
        assert_drawn(drawn[chart_id], [day_x(d) for d in days], expected)
        assert_table(table(operator, chart_id), days, in_drawn_order(drawn[chart_id], expected))
    # The newest version's own charts, per day.
    newest = {"2.0.0": answers["2.0.0"]}
    assert _assert_side_charts(operator, drawn, newest, DETAIL_CHARTS[:-1]) == 5
    # Drift per day against the reference: the drift API over each day.
    focus_days = sorted(answers["2.0.0"])
    psi: dict[str, list[Any]] = {"input x0": [], "input x1": [], "output label": []}
    for day in focus_days:
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        drift = fleet.api(
            f"/v1/models/{MODEL}/versions/2.0.0/drift",
            **{"from": start.isoformat(), "to": (start + timedelta(days=1)).isoformat()},
        )["drift"]
        for side in ("inputs", "outputs"):
            for row in drift[side]:
                psi[f"{side[:-1]} {row['name']}"].append(row["psi"])
    assert_drawn(drawn["drift_psi"], [day_x(d) for d in focus_days], psi)
    heatmap = operator.page.eval_on_selector_all(
        "#drift-heatmap tbody tr",
        "rows => rows.map(r => Array.from(r.children).map(c => c.textContent.trim()))",
    )
    assert_table(heatmap, sorted(psi), [list(col) for col in zip(*psi.values(), strict=True)])
    # Hiding a series (a click on its legend entry) redraws the canvas without it.
    before = chart_pixels(operator, "latency")
    operator.page.locator("#latency-plot .u-legend tr.u-series").nth(2).click()
    operator.page.wait_for_function("() => window.edgefleetCharts.latency.series[2].show === false")
    operator.page.wait_for_function(
        "([id, before]) => document.querySelector(`#${id}-plot canvas`).toDataURL() !== before",
        arg=["latency", before],
    )
    assert chart_pixels(operator, "latency") != before
    _clean(operator)


def test_a_viewer_sees_too_few_devices_where_the_api_withholds(
    viewer: Visitor, fleet: SeededFleet
) -> None:
    withheld = _metrics(fleet, "1.1.0", role="viewer")
    assert withheld["total"]["withheld"] == "too few devices (fewer than 5)"
    viewer.goto(f"/ui/models/{MODEL}" + _query(fleet.span))
    row = viewer.page.locator("table.totals tbody tr", has_text="1.1.0")
    assert "too few devices (fewer than 5)" in row.inner_text()
    inferences = series_of(viewer.charts()["inferences"])
    assert set(inferences["1.1.0"]) == {None}
    cells = table(viewer, "inferences")
    assert any(r[2] == "too few devices" for r in cells)  # columns: day, 2.0.0, 1.1.0, 1.0.0
    _clean(viewer)


def test_compare_page_draws_both_versions_from_the_api(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/models/{MODEL}/compare" + _query(fleet.span, a="1.0.0", b="2.0.0"))
    sides = {v: _by_day(_metrics(fleet, v)) for v in ("1.0.0", "2.0.0")}
    assert _assert_side_charts(operator, operator.charts(), sides) == 6
    drift = fleet.api(f"/v1/models/{MODEL}/versions/2.0.0/drift", against="1.0.0", **fleet.span)[
        "drift"
    ]
    shown = operator.page.locator("table.drift tbody tr", has_text="input x0").inner_text()
    x0 = next(r for r in drift["inputs"] if r["name"] == "x0")
    assert f"{x0['psi']:.4g}" in shown
    _clean(operator)


def test_rollout_page_draws_each_gate_against_its_threshold_from_the_decision_log(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/rollouts/{fleet.rollout_id}")
    rollout = fleet.api(f"/v1/rollouts/{fleet.rollout_id}", limit=1000)
    judged = [d for d in reversed(rollout["decisions"]) if d["figures"].get("verdict")]
    assert len(judged) >= 3
    drawn = operator.charts()
    gates = [g["gate"] for g in judged[0]["figures"]["verdict"]["gates"]]
    assert sorted(drawn) == sorted(f"gate_{g}" for g in gates)
    for gate in gates:
        points = [
            next(g for g in d["figures"]["verdict"]["gates"] if g["gate"] == gate) for d in judged
        ]
        expected = {
            name: [p[key] for p in points]
            for name, key in (
                ("estimate", "estimate"),
                ("lower bound", "lower"),
                ("upper bound", "upper"),
                ("threshold", "threshold"),
            )
        }
        assert_drawn(drawn[f"gate_{gate}"], [at_x(d["at"]) for d in judged], expected)
        rows = table(operator, f"gate_{gate}")
        assert_table(rows, [r[0] for r in rows], in_drawn_order(drawn[f"gate_{gate}"], expected))
        assert all(p["status"] in r[0] for p, r in zip(points, rows, strict=True))
    arms = rollout["arms"]
    assert operator.page.inner_text("#arms").startswith(
        f"Selected devices: {arms['selected']}; treatment arm {arms['treatment']},"
        f" control arm {arms['control']}."
    )
    listed = min(len(rollout["decisions"]), 20)  # the newest 20 unless asked for all
    assert operator.page.locator("#decisions > tbody > tr").count() == listed
    _clean(operator)


def test_treatment_against_control_is_what_the_evaluator_judged(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/rollouts/{fleet.rollout_id}/compare")
    twin = fleet.api(f"/ui/rollouts/{fleet.rollout_id}/compare.json")
    rollout = fleet.api(f"/v1/rollouts/{fleet.rollout_id}", limit=1000)
    last = next(d for d in rollout["decisions"] if d["figures"].get("verdict"))["figures"]
    for arm in ("treatment", "control"):
        assert twin["arms"][arm]["devices"] == last["devices"][arm]
        assert twin["arms"][arm]["total"]["inferences"] == last["inferences"][arm]
        days = twin["arms"][arm]["days"]
        assert sum(d["inferences"] for d in days.values()) == last["inferences"][arm]
    drawn = operator.charts()
    for spec in twin["charts"]:
        assert drawn[spec["id"]]["data"] == spec["data"]
        assert drawn[spec["id"]]["labels"][1:] == spec["labels"]
    _clean(operator)


def test_a_viewer_sees_no_controls_and_is_refused_an_action(
    viewer: Visitor, fleet: SeededFleet
) -> None:
    before = fleet.api(f"/v1/rollouts/{fleet.rollout_id}")["state"]
    viewer.goto(f"/ui/rollouts/{fleet.rollout_id}")
    assert viewer.page.locator("#rollout-panel").count() == 1
    assert viewer.page.locator("#controls, button.control").count() == 0
    csrf = viewer.page.eval_on_selector("body", "b => JSON.parse(b.getAttribute('hx-headers'))")
    answer = viewer.context.request.post(
        f"{fleet.base}/ui/rollouts/{fleet.rollout_id}/pause",
        headers={**csrf, "Origin": fleet.base},
        max_redirects=0,
    )
    assert answer.status == 403
    assert "role viewer may not operate" in answer.text()
    assert fleet.api(f"/v1/rollouts/{fleet.rollout_id}")["state"] == before
    _clean(viewer)


def test_an_operator_pauses_and_resumes_from_the_page(
    operator: Visitor, fleet: SeededFleet
) -> None:
    path = f"/v1/rollouts/{fleet.rollout_id}"
    assert fleet.api(path)["state"] in ("running", "waiting-for-approval")
    operator.goto(f"/ui/rollouts/{fleet.rollout_id}")
    operator.page.click("button[data-action=pause]")
    operator.page.wait_for_selector("#rollout-state:text-is('paused')")
    assert fleet.api(path)["state"] == "paused"
    assert operator.page.inner_text("#action-message") == "pause: done"
    assert operator.page.locator("button[data-action=pause]").count() == 0
    operator.page.click("button[data-action=resume]")
    operator.page.wait_for_selector("#rollout-state:text-is('running')")
    after = fleet.api(path)
    assert after["state"] == "running"
    newest = after["decisions"][:2]
    assert [d["action"] for d in newest] == ["resume", "pause"]
    assert {d["actor"] for d in newest} == {"operator:operator-1"}
    _clean(operator)


def test_a_long_decision_log_lists_the_newest_and_links_to_every_decision(
    operator: Visitor, fleet: SeededFleet
) -> None:
    path = f"/v1/rollouts/{fleet.rollout_id}"
    shown = 20  # server/ui/pages.py: decisions_shown
    decisions = fleet.api(path, limit=1000)["decisions"]
    while len(decisions) <= shown:  # an operator's pauses and resumes lengthen the log
        for action in ("pause", "resume"):
            _post(fleet.client, f"{path}/{action}", fleet.tokens["operator"], {})
        decisions = fleet.api(path, limit=1000)["decisions"]
    operator.goto(f"/ui/rollouts/{fleet.rollout_id}")
    rows = operator.page.locator("#decisions > tbody > tr")
    newest = [str(d["id"]) for d in decisions[:shown]]
    assert [rows.nth(i).get_attribute("data-decision") for i in range(rows.count())] == newest
    assert operator.page.inner_text("#decisions-shown").startswith(
        f"The newest {shown} of {len(decisions)} decisions."
    )
    operator.page.click("#all-decisions")
    operator.page.wait_for_url(f"**/ui/rollouts/{fleet.rollout_id}?decisions=all#decisions")
    every = [str(d["id"]) for d in decisions]
    assert [rows.nth(i).get_attribute("data-decision") for i in range(rows.count())] == every
    assert operator.page.locator("#decisions-shown").count() == 0
    _clean(operator)
