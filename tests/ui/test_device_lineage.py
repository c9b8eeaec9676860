"""The Device and Lineage pages, the Fleet page's install outcomes and the Rollout page's layout
in Chromium against the seeded fleet: every chart draws exactly the API's figures and its table
shows the same, hiding a series changes the canvas, no console errors, no request leaves the
server."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tests.ui.checks import assert_drawn, assert_table, chart_pixels, day_x, in_drawn_order, table
from tests.ui.fleet import MLFLOW, MLFLOW_URI, MODEL, REVERTED_RING, SeededFleet, Visitor

FAILED = ("self-test-failed", "verify-failed", "download-failed")


def _clean(visitor: Visitor) -> None:
    assert visitor.console_errors == []
    assert visitor.foreign_requests() == []


def _rows(visitor: Visitor, selector: str) -> list[list[str]]:
    rows: list[list[str]] = visitor.page.eval_on_selector_all(
        f"{selector} tbody tr",
        "rows => rows.map(r => Array.from(r.children).map(c => c.textContent.trim()))",
    )
    return rows


def _days(first: str, last: str) -> list[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]


def _day(at: str) -> str:
    return datetime.fromisoformat(at).astimezone(UTC).date().isoformat()


def _hide_a_series_redraws(visitor: Visitor, chart_id: str) -> None:
    """A click on a legend entry hides its series and changes the canvas."""
    before = chart_pixels(visitor, chart_id)
    visitor.page.locator(f"#{chart_id}-plot .u-legend tr.u-series").nth(1).click()
    visitor.page.wait_for_function(
        f"() => window.edgefleetCharts[{chart_id!r}].series[1].show === false"
    )
    visitor.page.wait_for_function(
        "([id, before]) => document.querySelector(`#${id}-plot canvas`).toDataURL() !== before",
        arg=[chart_id, before],
    )
    assert chart_pixels(visitor, chart_id) != before


def test_device_page_draws_its_event_log_and_shows_pairing_and_telemetry(
    operator: Visitor, fleet: SeededFleet
) -> None:
    device = REVERTED_RING
    operator.goto(f"/ui/devices/{device}")
    events = fleet.api(f"/v1/devices/{device}/events", limit=1000)["events"]
    history = fleet.api(f"/v1/devices/{device}/history")
    # The ring reported once, installed 1.0.0, tried 1.1.0 and went back.
    assert [e["kind"] for e in events] == ["revert", "install", "install", "reported"]
    days = _days(min(_day(e["at"]) for e in events), max(_day(e["at"]) for e in events))
    count = Counter((_day(e["at"]), e["kind"], e["outcome"]) for e in events)

    def per_day(kind: str, *outcomes: str | None) -> list[Any]:
        return [sum(count[(d, kind, o)] for o in outcomes) for d in days]

    expected = {
        "installed": per_day("install", "ok"),
        "self-test failed": per_day("install", "self-test-failed"),
        "verify or download failed": per_day("install", "verify-failed", "download-failed"),
        "reverted": per_day("revert", None),
        "switched": per_day("switch", None),
    }
    assert sum(expected["reverted"]) == 1 and sum(expected["installed"]) == 2
    drawn = operator.charts()
    assert_drawn(drawn["events"], [day_x(d) for d in days], expected)
    assert_table(table(operator, "events"), days, in_drawn_order(drawn["events"], expected))
    shown = _rows(operator, "#event-log")
    assert [r[1] for r in shown] == [e["kind"] for e in events]
    assert "error: watchdog reset after activation" in shown[0][5]
    relay = history["pairing"]["relay_id"]
    assert relay == "phone-003"
    assert operator.page.locator(f'#pairing a[href="/ui/devices/{relay}"]').count() == 1
    done = history["last_telemetry"]["completeness"]
    facts = operator.page.inner_text("#last-telemetry")
    assert f"{done['batches_received']} / {done['batches_expected']}" in facts
    assert f"{100 * done['completeness']:.1f}%" in facts
    assert [r[3] for r in _rows(operator, "#assignments")] == [
        a["source"] for a in history["assignments"]
    ]
    assert _rows(operator, "#installed")[0][4] == "a: active, b: failed"
    _hide_a_series_redraws(operator, "events")
    # The relay's page names the ring it relays for, and leads back to it.
    operator.goto(f"/ui/devices/{relay}")
    assert operator.page.locator(f'#pairing a[href="/ui/devices/{device}"]').count() == 1
    _clean(operator)


def test_device_page_keeps_to_the_span_asked_for(operator: Visitor, fleet: SeededFleet) -> None:
    device = REVERTED_RING
    everything = fleet.api(f"/v1/devices/{device}/events", limit=1000)["events"]
    last_day = _day(everything[0]["at"])
    operator.goto(f"/ui/devices/{device}?from={last_day}&to={last_day}")
    events = fleet.api(f"/v1/devices/{device}/events", **{"from": last_day, "to": last_day})
    assert [e["kind"] for e in events["events"]] == ["revert"]
    drawn = operator.charts()["events"]
    assert drawn["data"][0] == [day_x(last_day)]
    assert [r[1] for r in _rows(operator, "#event-log")] == ["revert"]
    # A device that never checked in has a page that says so, with nothing to draw.
    response = operator.goto("/ui/devices/phone-038")
    assert response.status == 200
    assert "last check-in never" in operator.page.inner_text(".summary")
    assert operator.page.inner_text("#events .empty") == "No data in this span."
    assert _rows(operator, "#event-log") == [["No event in this span."]]
    _clean(operator)


def test_fleet_page_draws_install_outcomes_per_day_from_the_event_log(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto("/ui/")
    summary = fleet.api("/v1/fleet/summary")
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(29, -1, -1)]
    installs: dict[str, Counter[str]] = {d: Counter() for d in days}
    for row in summary["install_outcomes"]:
        installs[row["day"]]["installed" if row["outcome"] == "ok" else "failed"] += row["count"]
    reverts: Counter[str] = Counter()
    for device in fleet.api("/v1/devices"):
        answer = fleet.api(f"/v1/devices/{device['id']}/events", limit=1000)
        reverts.update(_day(e["at"]) for e in answer["events"] if e["kind"] == "revert")
    expected = {
        "installed": [installs[d]["installed"] for d in days],
        "failed": [installs[d]["failed"] for d in days],
        "reverted": [reverts[d] for d in days],
    }
    assert sum(expected["installed"]) > 40 and sum(expected["failed"]) == 2
    assert sum(expected["reverted"]) == 1
    assert sum(1 for n in expected["installed"] if n) >= 3  # spread over days
    drawn = operator.charts()
    assert_drawn(drawn["install_outcomes"], [day_x(d) for d in days], expected)
    rows = table(operator, "install_outcomes")
    assert_table(rows, days, in_drawn_order(drawn["install_outcomes"], expected))
    _hide_a_series_redraws(operator, "install_outcomes")
    # Device lists lead to the Device page: the newest failures and reverts, the silent devices.
    trouble = _rows(operator, "#trouble")
    assert {r[1] for r in trouble} == {"phone-004", "phone-017", REVERTED_RING}
    assert operator.page.locator(f'#trouble a[href="/ui/devices/{REVERTED_RING}"]').count() == 1
    silent = summary["silent_devices"][0]["id"]
    assert operator.page.locator(f'#silent a[href="/ui/devices/{silent}"]').count() == 1
    _clean(operator)


def test_lineage_page_shows_the_lineage_api_and_draws_devices_per_day(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/models/{MODEL}?version=2.0.0")
    link = f"/ui/models/{MODEL}/versions/2.0.0/lineage"
    operator.page.click(f'#matrix a[href="{link}"]')
    operator.page.wait_for_url(fleet.base + link)
    lineage = fleet.api(f"/v1/models/{MODEL}/versions/2.0.0/lineage")
    per_day = {d["day"]: d for d in lineage["devices_per_day"]}
    days = _days(min(per_day), max(per_day))
    drawn = operator.charts()
    for chart_id in ("devices", "inferences"):
        expected = {chart_id: [per_day[d][chart_id] if d in per_day else 0 for d in days]}
        assert_drawn(drawn[chart_id], [day_x(d) for d in days], expected)
        assert_table(table(operator, chart_id), days, [expected[chart_id]])
    # MLflow: the run in its experiment, the registered model version.
    source = MLFLOW["2.0.0"]
    run = f"{MLFLOW_URI}/#/experiments/3/runs/{source['run_id']}"
    assert lineage["mlflow"] == {
        "run": run,
        "model_version": f"{MLFLOW_URI}/#/models/{MODEL}/versions/7",
        "registered_model": f"{MLFLOW_URI}/#/models/{MODEL}",
    }
    assert operator.page.get_attribute("#mlflow a.mlflow-run", "href") == run
    version_link = operator.page.get_attribute("#mlflow a.mlflow-version", "href")
    assert version_link == lineage["mlflow"]["model_version"]
    facts = operator.page.inner_text("#provenance")
    assert lineage["provenance"]["source_model_sha256"] in facts
    # Per target: bundle SHA-256s, the converter's figures, the rig's verdict.
    targets = {r[0]: r[1:] for r in _rows(operator, "#targets")}
    assert targets["bundle SHA-256"] == [t["bundle_sha256"] for t in lineage["targets"]]
    assert targets["measured: accuracy"] == [
        f"{t['metrics']['accuracy']:.4g}" for t in lineage["targets"]
    ]
    assert targets["HIL verdict"] == ["passed (1 run)"] * len(lineage["targets"])
    rollouts = _rows(operator, "#rollouts")
    assert [r[0] for r in rollouts] == [f"Rollout {r['id']}" for r in lineage["rollouts"]]
    total = lineage["field"]["total"]
    row = _rows(operator, "table.totals")[0]
    assert row[:3] == ["2.0.0", str(total["devices_reporting"]), str(total["inferences"])]
    _hide_a_series_redraws(operator, "inferences")
    _clean(operator)


def test_a_run_without_registry_entry_links_the_run_and_viewers_see_too_few_devices(
    viewer: Visitor, fleet: SeededFleet
) -> None:
    viewer.goto(f"/ui/models/{MODEL}/versions/1.1.0/lineage")
    lineage = fleet.api(f"/v1/models/{MODEL}/versions/1.1.0/lineage", role="viewer")
    run = f"{MLFLOW_URI}/#/runs/{MLFLOW['1.1.0']['run_id']}"
    assert lineage["mlflow"] == {"run": run, "model_version": None, "registered_model": None}
    assert viewer.page.get_attribute("#mlflow a.mlflow-run", "href") == run
    assert viewer.page.locator("#mlflow a.mlflow-version").count() == 0
    assert lineage["field"]["total"]["withheld"] == "too few devices (fewer than 5)"
    row = viewer.page.locator("table.totals tbody tr", has_text="1.1.0").inner_text()
    assert "too few devices (fewer than 5)" in row
    # A version with no MLflow origin says so.
    viewer.goto(f"/ui/models/{MODEL}/versions/1.0.0/lineage")
    assert fleet.api(f"/v1/models/{MODEL}/versions/1.0.0/lineage")["mlflow"] is None
    assert viewer.page.locator("#mlflow").count() == 0
    _clean(viewer)


def test_rollout_tables_fit_the_page_and_decisions_show_their_figures_compactly(
    operator: Visitor, fleet: SeededFleet
) -> None:
    operator.goto(f"/ui/rollouts/{fleet.rollout_id}")
    overflowing = operator.page.evaluate(
        """() => Array.from(document.querySelectorAll('.table-wrap'))
             .filter(w => w.scrollWidth > w.clientWidth + 1).map(w => w.firstElementChild.id)"""
    )
    assert overflowing == []
    page_width = operator.page.evaluate("() => document.documentElement.scrollWidth")
    assert page_width <= operator.page.viewport_size["width"]
    rollout = fleet.api(f"/v1/rollouts/{fleet.rollout_id}", limit=1000)
    newest = rollout["decisions"][0]
    row = operator.page.locator(f'#decisions tr[data-decision="{newest["id"]}"]')
    reason = row.locator("td.reason").inner_text()
    verdict = newest["figures"]["verdict"]
    held = [g["gate"] for g in verdict["gates"] if g["status"] == "hold"]
    if held:  # the gates' reasons become which gates held, and the figures sit beside them
        assert f"{len(held)} holding ({', '.join(held)})" in reason
        assert len(reason.splitlines()[0]) < len(newest["reason"])
    figures = row.locator("dl.compact").inner_text()
    devices = newest["figures"]["devices"]
    assert f"{devices['treatment']} / {devices['control']}" in figures
    gates = row.locator("table.inner > tbody > tr > th").all_inner_texts()
    assert gates == [g["gate"] for g in verdict["gates"]] + [h["name"] for h in verdict["health"]]
    _clean(operator)
