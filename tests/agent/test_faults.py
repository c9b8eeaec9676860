"""Faults through real processes: the agent SIGKILLed (from this test, outside the process) at
each install step and during download, and the server gone for a while.

Each kill uses the agent's crash-test hook (``EDGEFLEET_AGENT_TEST_PAUSE_AT``): at the step the
agent writes ``<state_dir>/paused-at-<step>`` and sleeps; the test waits for that file and kills
it there. The agent then restarts while the server is down (so nothing can repair the state
before the test looks): version 1 must still answer. Then the server returns on the same port
and data, and the agent must finish installing version 2 without fetching it twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.local_api import LocalApiClient, socket_path
from firmware_bundles import SigningKey
from tests.agent.e2e_bundles import MODEL, PROBE, E2EBundle, build_bundle
from tests.agent.test_e2e import active_version, agent_on_v1, rollup_count
from tests.procs import AgentProcess, ServerProcess, wait_for


@dataclass
class Rig:
    server: ServerProcess
    agent: AgentProcess
    key: SigningKey
    tmp: Path

    @property
    def client(self) -> LocalApiClient:
        return LocalApiClient(socket_path(self.agent.state_dir))

    def bundle(self, version: str, counter: int, seed: int) -> E2EBundle:
        return build_bundle(self.tmp, self.key, version=version, release_counter=counter, seed=seed)


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A server with version 1 released, and an agent that has installed it."""
    with agent_on_v1(tmp_path) as (server, agent, key, _):
        yield Rig(server, agent, key, tmp_path)


def bundle_requests(server: ServerProcess, bundle_sha256: str) -> list[dict[str, object]]:
    return [r for r in server.requests() if r["path"] == f"/v1/bundles/{bundle_sha256}"]


@pytest.mark.parametrize("step", ["download", "written", "fsynced", "switched", "self-tested"])
def test_sigkill_at_each_install_step_keeps_the_old_model_and_resumes(rig: Rig, step: str) -> None:
    server, agent = rig.server, rig.agent
    v1_out = LocalApiClient(socket_path(agent.state_dir)).predict(MODEL, PROBE)
    assert agent.stop() == 0

    v2 = rig.bundle("2.0.0", 2, seed=2)
    v2_bundle_sha256 = server.publish_and_release(v2.path, MODEL, "2.0.0")
    marker = agent.state_dir / f"paused-at-{step}"
    agent.start(test_pause_at=step)
    wait_for(marker.exists, f"the agent to pause at {step}")
    agent.kill()
    if step == "download":
        # The interrupted request is logged once the server sees the connection drop.
        wait_for(
            lambda: bundle_requests(server, v2_bundle_sha256), "the interrupted download in the log"
        )

    # Restart while the server is down: the old model answers, nothing else has happened yet.
    server.stop()
    marker.unlink()
    agent.start()
    client = rig.client
    wait_for(lambda: client.status()["device_id"], "the restarted agent's socket")
    np.testing.assert_allclose(
        client.predict(MODEL, PROBE)["probabilities"], v1_out["probabilities"], atol=1e-6
    )
    status = client.status()
    assert status["models"][MODEL]["version"] == "1.0.0"
    if step == "download":
        assert 0 < status["downloads"][v2_bundle_sha256] < v2.length
    wait_for(lambda: agent.events("backoff", latest=True), "a backoff while the server is down")

    # The server returns (same port, same data): the install completes, version 2 answers.
    server.start()
    wait_for(lambda: active_version(agent) == "2.0.0", "version 2.0.0 to be active")
    np.testing.assert_allclose(
        client.predict(MODEL, PROBE)["probabilities"], v2.expected(PROBE), atol=1e-6
    )
    assert not marker.exists() and agent.alive()

    requests = bundle_requests(server, v2_bundle_sha256)
    served = sum(int(str(r["bytes_sent"])) for r in requests)
    if step == "download":
        offsets = [int(str(r["range"]).removeprefix("bytes=").rstrip("-")) for r in requests[1:]]
        assert requests[0]["range"] is None
        assert offsets and all(offset > 0 for offset in offsets)
        assert served < 2 * v2.length
    else:
        # Killed after the download: the complete file is reused, not fetched again.
        assert [r["range"] for r in requests] == [None]
        assert served == v2.length


def test_server_outage_inference_goes_on_and_telemetry_arrives_exactly(rig: Rig) -> None:
    server, agent, client = rig.server, rig.agent, rig.client
    made = 0
    for _ in range(7):
        client.predict(MODEL, PROBE)
        made += 1
    wait_for(lambda: rollup_count(server) == made, f"{made} inferences in the rollups")

    server.stop()
    for _ in range(25):
        client.predict(MODEL, PROBE)
        made += 1
    # The agent finds the server gone; the windows wait in the outbox.
    wait_for(lambda: agent.events("backoff"), "the agent to back off")
    outbox = wait_for(lambda: pending(client.status()["outbox"]), "windows waiting in the outbox")
    assert outbox["dropped_windows"] == 0
    table = agent.agent_cli("status")
    assert table.returncode == 0 and "outbox open windows" in table.stdout

    server.start()
    wait_for(lambda: rollup_count(server) == made, f"{made} inferences in the rollups")
    wait_for(lambda: not pending(client.status()["outbox"]), "the outbox to drain")
    assert rollup_count(server) == made


def pending(outbox: dict[str, int]) -> dict[str, int] | None:
    """The outbox stats if windows or batches wait in it, else None."""
    waiting = outbox["open_windows"] + outbox["closed_windows"] + outbox["pending_batches"]
    return outbox if waiting else None
