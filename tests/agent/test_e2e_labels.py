"""A label sent 7 days after its prediction, after the device switched versions, counts for the
version that predicted: through `edgefleet serve` (uvicorn) and `edgefleet agent run` processes.

The agent's clock is moved with the test-only setting ``test_clock_offset_s``: the first agent
process runs 7 days behind the system clock, installs 1.0.0 and predicts (so the prediction is
really made, and uploaded, 7 days "ago" for the agent and the server's rollup day); the agent is
then restarted on the system clock, installs 2.0.0, predicts with it, and the label arrives
through `edgefleet agent label --predicted-at --version 1.0.0`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.local_api import LocalApiClient, socket_path
from tests.agent.e2e_bundles import CLASSES, MODEL, PROBE, build_bundle
from tests.agent.test_e2e import active_version, agent_settings
from tests.procs import AgentProcess, ServerProcess, wait_for

WEEK_S = 7 * 86400


def rollups(server: ServerProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.api(
        "GET", "/v1/telemetry/rollups", params={"model": MODEL}
    )
    return found


def by_version_and_day(server: ServerProcess) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["version"], str(r["day"])): r for r in rollups(server)}


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[tuple[ServerProcess, AgentProcess]]:
    server = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path)
    agent: AgentProcess | None = None
    try:
        server.start()
        settings = agent_settings(server, tmp_path / "state", server.enroll_token())
        agent = AgentProcess(tmp_path / "state", tmp_path, settings)
        yield server, agent
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def test_a_label_a_week_late_after_a_version_switch_counts_for_the_version_that_predicted(
    processes: tuple[ServerProcess, AgentProcess], tmp_path: Path
) -> None:
    server, agent = processes
    key = server.release_key
    v1 = build_bundle(tmp_path, key, version="1.0.0", release_counter=1, seed=1)
    v2 = build_bundle(tmp_path, key, version="2.0.0", release_counter=2, seed=2)
    server.publish_and_release(v1.path, MODEL, "1.0.0")

    # A week ago (for the agent): 1.0.0 is installed and makes one prediction.
    agent.start(test_clock_offset_s=str(-WEEK_S))
    wait_for(lambda: active_version(agent) == "1.0.0", "1.0.0 to be active")
    client = LocalApiClient(socket_path(agent.state_dir))
    before = datetime.now(UTC) - timedelta(seconds=WEEK_S)
    outputs = client.predict(MODEL, PROBE)
    after = datetime.now(UTC) - timedelta(seconds=WEEK_S)
    np.testing.assert_allclose(outputs["probabilities"], v1.expected(PROBE), atol=1e-6)
    predicted = CLASSES[int(np.argmax(outputs["probabilities"]))]
    predicted_at = after  # as the app noted it, when the answer came
    day = predicted_at.date().isoformat()
    assert before.date() == after.date()  # one rollup day (fails only within a second of 00:00)
    wait_for(
        lambda: by_version_and_day(server).get(("1.0.0", day), {}).get("inference_count") == 1,
        f"the 1.0.0 prediction in the rollup of {day}",
    )
    assert agent.stop() == 0

    # Now: 2.0.0 is released; the agent, on the system clock again, installs it and predicts.
    server.publish_and_release(v2.path, MODEL, "2.0.0")
    agent.start(test_clock_offset_s=None)
    wait_for(lambda: active_version(agent) == "2.0.0", "2.0.0 to be active")
    np.testing.assert_allclose(
        client.predict(MODEL, PROBE)["probabilities"], v2.expected(PROBE), atol=1e-6
    )

    # The label arrives, naming the prediction's time and the version that made it.
    truth = next(c for c in CLASSES if c != predicted)
    sent = agent.agent_cli(
        "label",
        MODEL,
        truth,
        "--predicted",
        predicted,
        "--predicted-at",
        predicted_at.isoformat().replace("+00:00", "Z"),
        "--version",
        "1.0.0",
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    refused = agent.agent_cli(
        "label", MODEL, truth, "--predicted-at", predicted_at.isoformat(), "--version", "3.0.0"
    )
    assert refused.returncode == 1
    assert "a version of e2e-activity this device ran (1.0.0, 2.0.0), got '3.0.0'" in (
        refused.stderr.replace("\n", "")
    )

    today = datetime.now(UTC).date().isoformat()
    wait_for(
        lambda: by_version_and_day(server).get(("1.0.0", day), {}).get("labels"),
        f"the label in 1.0.0's rollup of {day}",
    )
    wait_for(
        lambda: by_version_and_day(server).get(("2.0.0", today), {}).get("inference_count") == 1,
        "the 2.0.0 prediction in today's rollup",
    )
    found = by_version_and_day(server)
    assert found[("1.0.0", day)]["labels"] == {predicted: {truth: 1}}
    # The label came in a window of its own (a late piece of the prediction's second, no
    # inferences), which the server took.
    assert found[("1.0.0", day)]["inference_count"] == 1
    assert found[("1.0.0", day)]["window_count"] == 2
    assert found[("2.0.0", today)]["labels"] == {}
    assert sorted(found) == sorted([("1.0.0", day), ("2.0.0", today)])
    print(
        json.dumps(
            {
                "predicted_at": predicted_at.isoformat(),
                "today": today,
                "rollups": {
                    f"{v} {d}": {k: r[k] for k in ("inference_count", "window_count", "labels")}
                    for (v, d), r in found.items()
                },
            }
        )
    )
