"""Going back through real processes (docs/rollback.md): `edgefleet serve` and `edgefleet agent
run`. v1 released and confirmed, v2 released and activated, v2 withdrawn: the agent returns to
v1 from its standby slot with no second download of v1, and v1 answers predictions; a version
below the confirmed one is then never taken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device_agent.local_api import LocalApiClient, socket_path
from tests.agent.e2e_bundles import MODEL, PROBE, build_bundle
from tests.agent.test_e2e import active_version, agent_on_v1
from tests.procs import ServerProcess, wait_for


def _gets(server: ServerProcess, bundle_sha256: str) -> list[dict[str, object]]:
    path = f"/v1/bundles/{bundle_sha256}"
    return [r for r in server.requests() if r["path"] == path and r.get("method") == "GET"]


def test_withdrawn_v2_goes_back_to_confirmed_v1_from_standby_without_a_download(
    tmp_path: Path,
) -> None:
    with agent_on_v1(tmp_path) as (server, agent, key, v1):
        # Bad input to `edgefleet confirm`: refused, naming the problem, exit 1.
        for args, reason in (
            (("9.9.9",), "HTTP 404"),
            (("1.0.0", "--hardware-id", "toaster-9"), "HTTP 400"),
        ):
            done = server.cli("confirm", MODEL, *args)
            assert done.returncode == 1 and reason in done.stderr, done.stderr
        done = server.cli("confirm", MODEL, "1.0.0", "--json")
        assert done.returncode == 0, done.stderr
        confirmed = json.loads(done.stdout)
        assert confirmed["release_counter"] == 1 and confirmed["confirmed_for"] == ["phone-android"]

        v2 = build_bundle(tmp_path, key, version="2.0.0", release_counter=2, seed=2)
        server.publish_and_release(v2.path, MODEL, "2.0.0")
        wait_for(lambda: active_version(agent) == "2.0.0", "version 2.0.0 to be active")
        assert len(_gets(server, v1.bundle_sha256())) == 1

        withdrawn = server.cli("withdraw", MODEL, "2.0.0")
        assert withdrawn.returncode == 0, withdrawn.stderr
        wait_for(lambda: active_version(agent) == "1.0.0", "version 1.0.0 to be active again")

        entry = agent.status()["models"][MODEL]
        assert entry["bundle_sha256"] == v1.bundle_sha256() and entry["last_install"] == "ok"
        assert entry["last_error"] is None
        assert len(_gets(server, v1.bundle_sha256())) == 1, "v1 came from the standby slot"
        assert len(_gets(server, v2.bundle_sha256())) == 1
        client = LocalApiClient(socket_path(agent.state_dir))
        got = client.predict(MODEL, PROBE)
        np.testing.assert_allclose(got["probabilities"], v1.expected(PROBE), rtol=1e-5, atol=1e-6)
        trust = json.loads((agent.state_dir / "trust.json").read_text())
        assert trust["release_counters"] == {MODEL: 1}
        assert trust["installed_release_counters"] == {MODEL: 2}


def test_a_rolled_back_rollout_returns_its_devices_without_a_download(tmp_path: Path) -> None:
    """A rollout of v2 to every device (one stage at 100%), rolled back by an operator: the real
    agent installs v1 again from its standby slot, and the decision log names the operator."""
    with agent_on_v1(tmp_path) as (server, agent, key, v1):
        assert server.cli("confirm", MODEL, "1.0.0").returncode == 0
        v2 = build_bundle(tmp_path, key, version="2.0.0", release_counter=2, seed=2)
        done = server.cli("publish", str(v2.path))
        assert done.returncode == 0, done.stderr
        done = server.cli(
            "rollout", "create", MODEL, "2.0.0", "--stages", "100", "--min-duration", "1h", "--json"
        )
        assert done.returncode == 0, done.stderr
        rollout = json.loads(done.stdout)
        assert rollout["state"] == "running" and rollout["previous"] == {"phone-android": "1.0.0"}
        wait_for(lambda: active_version(agent) == "2.0.0", "version 2.0.0 to be active")
        refused = server.cli("release", MODEL, "2.0.0")
        assert refused.returncode == 1 and f"rollout {rollout['id']}" in refused.stderr

        done = server.cli("rollout", "rollback", str(rollout["id"]), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "rolled-back"
        wait_for(lambda: active_version(agent) == "1.0.0", "version 1.0.0 to be active again")
        assert len(_gets(server, v1.bundle_sha256())) == 1, "v1 came from the standby slot"
        status = json.loads(server.cli("rollout", "status", str(rollout["id"]), "--json").stdout)
        last = status["decisions"][0]
        assert last["action"] == "rollback" and last["actor"].startswith("operator:")
        client = LocalApiClient(socket_path(agent.state_dir))
        got = client.predict(MODEL, PROBE)
        np.testing.assert_allclose(got["probabilities"], v1.expected(PROBE), rtol=1e-5, atol=1e-6)
