"""Downloads: Range resume across restarts, partials dropped with their assignment, failed
bundles not fetched again, bounded retries, and the download conditions."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from device_agent.agent import Agent
from device_agent.client import FleetClient
from device_agent.config import AgentSettings, write_conditions
from device_agent.errors import (
    NotOfferedError,
    ServerRejected,
    ServerUnreachable,
    StallError,
    TrustError,
)
from device_agent.fetch import BundleFetcher, partial_path
from device_agent.updater import CheckInResult
from tests.agent.conftest import MODEL, AgentFactory, Bundles, assert_answers
from tests.agent.simulator import FleetSimulator

STALL_AT = 8000


def _stalled(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> tuple[Agent, str, CheckInResult]:
    """v3 assigned, and an agent whose one download attempt stalled at :data:`STALL_AT`."""
    bundle_sha256 = sim.assign(MODEL, bundles.v3.data)
    sim.stall_after_bytes = STALL_AT
    agent = make_agent(max_download_attempts=1)
    return agent, bundle_sha256, agent.check_in()


def test_download_resumes_from_the_persisted_partial_after_a_restart(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    first, bundle_sha256, result = _stalled(make_agent, sim, bundles)
    assert isinstance(result.errors[MODEL], StallError)
    partial = partial_path(tmp_path / "state" / "partial", bundle_sha256)
    assert partial.stat().st_size == STALL_AT
    assert first.status()["downloads"] == {bundle_sha256: STALL_AT}

    sim.stall_after_bytes = None
    restarted = make_agent()
    assert restarted.check_in().installs[0].action == "installed"
    resumed = sim.downloads(bundle_sha256)[-1]
    assert resumed.status == 206 and resumed.range_start == STALL_AT
    assert sim.bytes_served(bundle_sha256) == len(bundles.v3.data) < 2 * len(bundles.v3.data)
    assert not partial.exists()
    assert_answers(restarted, bundles.v3)


def test_a_server_that_ignores_range_gets_a_fresh_download(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> None:
    _, bundle_sha256, _ = _stalled(make_agent, sim, bundles)
    sim.stall_after_bytes, sim.ignore_range = None, True
    agent = make_agent()
    assert agent.check_in().installs[0].action == "installed"
    assert sim.downloads(bundle_sha256)[-1].status == 200
    assert_answers(agent, bundles.v3)


def test_retries_are_bounded_and_each_one_resumes(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> None:
    bundle_sha256 = sim.assign(MODEL, bundles.v3.data)
    sim.stall_after_bytes = 1000
    agent = make_agent(max_download_attempts=4)
    assert isinstance(agent.check_in().errors[MODEL], StallError)
    starts = [r.range_start for r in sim.downloads(bundle_sha256)]
    assert starts == [None, 1000, 2000, 3000]
    assert agent.status()["models"][MODEL]["last_install"] == "download-failed"


def test_partial_is_dropped_when_the_assignment_disappears(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    agent, bundle_sha256, _ = _stalled(make_agent, sim, bundles)
    sim.offers.clear()
    result = agent.check_in()
    assert result.partials_dropped == [bundle_sha256] and result.installs == []
    assert not partial_path(tmp_path / "state" / "partial", bundle_sha256).exists()


def test_partial_is_kept_while_offline(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    agent, bundle_sha256, _ = _stalled(make_agent, sim, bundles)
    sim.offline = True
    with pytest.raises(ServerUnreachable, match="connection refused"):
        agent.check_in()
    assert partial_path(tmp_path / "state" / "partial", bundle_sha256).stat().st_size == STALL_AT


def test_a_bundle_that_failed_verification_is_not_fetched_again(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    agent = installed
    bundle_sha256 = sim.assign(MODEL, bundles.v2.data)
    sim.tamper_offset = 700
    assert isinstance(agent.check_in().errors[MODEL], TrustError)
    report = agent.check_in().installs[0]
    assert report.action == "skipped" and len(sim.downloads(bundle_sha256)) == 1
    # A new assignment (another bundle, then this one again) is fetched afresh.
    sim.tamper_offset = None
    sim.offers.clear()
    agent.check_in()
    sim.assign(MODEL, bundles.v2.data)
    assert agent.check_in().installs[0].action == "installed"
    assert len(sim.downloads(bundle_sha256)) == 2
    assert_answers(agent, bundles.v2)


def test_bundle_gone_from_the_server_is_reported_not_offered(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    bundle_sha256 = sim.assign(MODEL, bundles.v2.data)
    del sim.bundles[bundle_sha256]
    assert isinstance(installed.check_in().errors[MODEL], NotOfferedError)
    assert_answers(installed, bundles.v1)


@pytest.mark.parametrize(
    ("conditions", "settings", "reason"),
    [
        ({"unmetered": False, "charging": True}, {"unmetered_only": True}, "unmetered network"),
        ({"unmetered": True, "charging": False}, {"charging_only": True}, "charge"),
    ],
    ids=["metered-network", "not-charging"],
)
def test_download_waits_for_its_conditions_and_status_says_why(
    make_agent: AgentFactory,
    sim: FleetSimulator,
    bundles: Bundles,
    tmp_path: Path,
    conditions: dict[str, bool],
    settings: dict[str, bool],
    reason: str,
) -> None:
    bundle_sha256 = sim.assign(MODEL, bundles.v1.data)
    agent = make_agent(**settings)
    write_conditions(tmp_path / "state", **conditions)
    report = agent.check_in().installs[0]
    assert report.action == "waiting" and reason in report.detail
    assert reason in agent.status()["models"][MODEL]["waiting"]
    assert sim.downloads(bundle_sha256) == []
    write_conditions(tmp_path / "state", unmetered=True, charging=True)
    assert agent.check_in().installs[0].action == "installed"
    assert agent.status()["models"][MODEL]["waiting"] is None


def test_garbled_conditions_file_means_conditions_unmet(
    make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles, tmp_path: Path
) -> None:
    sim.assign(MODEL, bundles.v1.data)
    agent = make_agent(unmetered_only=True)
    (tmp_path / "state" / "conditions.json").write_text("{not json")
    assert agent.check_in().installs[0].action == "waiting"


# -- BundleFetcher on its own, against small MockTransports ------------------------------------

BODY = bytes(range(256)) * 8
SHA = "ab" * 32


def _fetcher(handler: httpx.MockTransport, tmp_path: Path, **settings: object) -> BundleFetcher:
    values = {
        "server_url": "https://fleet.simulator",
        "state_dir": tmp_path,
        "root_path": tmp_path / "root.json",
        "hardware_id": "phone-android",
        "backoff_initial_s": 1.0,
        "backoff_max_s": 3.0,
        **settings,
    }
    config = AgentSettings(**values)  # type: ignore[arg-type]
    client = FleetClient(httpx.Client(transport=handler), "https://fleet.simulator", tmp_path, 10)
    return BundleFetcher(client, config)


def test_backoff_doubles_up_to_its_cap_between_bounded_attempts(tmp_path: Path) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json={"detail": "down for maintenance"})

    fetcher = _fetcher(httpx.MockTransport(handler), tmp_path, max_download_attempts=4)
    slept: list[float] = []
    fetcher.sleep = slept.append
    with pytest.raises(ServerRejected, match="maintenance"):
        fetcher.fetch("https://fleet.simulator/b", SHA, len(BODY), tmp_path / "partial")
    assert len(calls) == 4 and slept == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotOfferedError), (410, NotOfferedError), (400, ServerRejected)],
    ids=["404", "410", "400"],
)
def test_refusals_are_not_retried(tmp_path: Path, status: int, error: type[Exception]) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"detail": "no"})

    fetcher = _fetcher(httpx.MockTransport(handler), tmp_path)
    with pytest.raises(error):
        fetcher.fetch("https://fleet.simulator/b", SHA, len(BODY), tmp_path / "partial")
    assert len(calls) == 1


def test_a_resume_at_the_wrong_offset_starts_again(tmp_path: Path) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        if request.headers.get("range"):
            return httpx.Response(
                206,
                content=BODY[10:],
                headers={"content-range": f"bytes 10-{len(BODY) - 1}/{len(BODY)}"},
            )
        return httpx.Response(200, content=BODY)

    (tmp_path / "partial").mkdir()
    partial_path(tmp_path / "partial", SHA).write_bytes(BODY[:100])
    fetcher = _fetcher(httpx.MockTransport(handler), tmp_path, backoff_initial_s=0.0)
    assert fetcher.fetch("https://x/b", SHA, len(BODY), tmp_path / "partial") == BODY
    assert seen == ["bytes=100-", None]


def test_a_short_body_is_resumed(tmp_path: Path) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        if request.headers.get("range") == "bytes=1000-":
            headers = {"content-range": f"bytes 1000-{len(BODY) - 1}/{len(BODY)}"}
            return httpx.Response(206, content=BODY[1000:], headers=headers)
        return httpx.Response(200, content=BODY[:1000], headers={"content-length": "1000"})

    fetcher = _fetcher(httpx.MockTransport(handler), tmp_path, backoff_initial_s=0.0)
    assert fetcher.fetch("https://x/b", SHA, len(BODY), tmp_path / "partial") == BODY
    assert seen == [None, "bytes=1000-"]


def test_status_files_are_json(installed: Agent, tmp_path: Path) -> None:
    status = json.loads((tmp_path / "state" / "agent.json").read_text())
    assert status["last_error"] is None and status["last_check_in"].startswith("2026-06-01")
