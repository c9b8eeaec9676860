"""A shadow rollout end to end through real processes (`edgefleet serve` under uvicorn, `edgefleet
agent run`): the candidate runs in the agent's shadow slot on a seeded sample of real calls, the
caller's answers are the active model's byte for byte, and the agreement the server shows equals
a direct comparison of the two models on exactly the calls that were sampled."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from device_agent.local_api import LocalApiClient, socket_path
from tests.agent.e2e_bundles import FEATURES, MODEL, E2EBundle, build_bundle
from tests.agent.test_e2e import active_version, agent_settings
from tests.procs import AgentProcess, ServerProcess, wait_for

SEED = 7
FRACTION = 0.3
CALLS = 300


def session_of(bundle: E2EBundle) -> ort.InferenceSession:
    """The bundle's model as the agent runs it (one intra-op thread, the agent's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(bundle.model_bytes, options, providers=["CPUExecutionProvider"])


def shadow_figures(server: ServerProcess, version: str) -> list[dict[str, Any]]:
    found = server.api(
        "GET", f"/v1/models/{MODEL}/versions/{version}/metrics", params={"by": "none"}
    )
    shadow: list[dict[str, Any]] = found["total"]["shadow"] or []
    return shadow


def test_a_shadow_candidate_is_compared_on_the_sampled_calls_only(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path)
    agent: AgentProcess | None = None
    try:
        server.start()
        v1 = build_bundle(tmp_path, server.release_key, version="1.0.0", release_counter=1, seed=1)
        v2 = build_bundle(tmp_path, server.release_key, version="2.0.0", release_counter=2, seed=2)
        server.publish_and_release(v1.path, MODEL, "1.0.0")
        server.publish(v2.path)
        settings = {
            **agent_settings(server, tmp_path / "state", server.enroll_token()),
            "shadow_seed": str(SEED),
            "shadow_queue_size": str(CALLS),  # room for every sample: none dropped
        }
        agent = AgentProcess(tmp_path / "state", tmp_path, settings).start()
        running = agent
        wait_for(lambda: active_version(running) == "1.0.0", "version 1.0.0 to be active")

        created = server.cli(
            "rollout", "create", MODEL, "2.0.0", "--stages", "100", "--shadow", str(FRACTION),
            "--json",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        client = LocalApiClient(socket_path(running.state_dir))
        client.check_in_now()  # not the hour the server asks devices to wait

        def shadowing() -> bool:
            entry = running.status()["models"][MODEL]
            return bool(entry.get("shadow")) and entry["shadow"]["version"] == "2.0.0"

        wait_for(shadowing, "2.0.0 in the shadow slot")
        # The standby A/B slot is untouched and 1.0.0 still answers.
        entry = running.status()["models"][MODEL]
        assert entry["version"] == "1.0.0" and entry["active_slot"] == "a"
        assert entry["shadow"]["sample_fraction"] == FRACTION

        rng = np.random.default_rng(11)
        inputs = rng.normal(0, 1, (CALLS, 1, FEATURES)).astype(np.float32)
        answers = [client.predict(MODEL, x)["probabilities"] for x in inputs]

        # The caller's answers are the active model's, byte for byte.
        active, candidate = session_of(v1), session_of(v2)
        expected = [active.run(None, {"input": x})[0] for x in inputs]
        for got, want in zip(answers, expected, strict=True):
            assert np.asarray(got, np.float32).tobytes() == want.tobytes()

        # The calls the agent sampled: the same seeded sequence, one draw per successful call.
        draw = random.Random(SEED).random
        sampled = [i for i in range(CALLS) if draw() < FRACTION]
        agreed = sum(
            int(
                np.argmax(expected[i], axis=-1)[0]
                == np.argmax(candidate.run(None, {"input": inputs[i]})[0], axis=-1)[0]
            )
            for i in sampled
        )
        disagreement = 1 - agreed / len(sampled)
        assert 0.1 <= disagreement <= 0.9, disagreement  # the models differ, but not always
        assert 0 < len(sampled) < CALLS

        def arrived() -> list[dict[str, Any]] | None:
            rows = shadow_figures(server, "1.0.0")
            return rows if rows and rows[0]["sampled"] == len(sampled) else None

        [row] = wait_for(arrived, f"{len(sampled)} shadow samples on the server")
        assert row["candidate_version"] == "2.0.0"
        assert row["dropped"] == 0 and row["errors"] == 0
        assert row["compared"] == len(sampled)
        assert row["agreed"] == agreed
        assert row["agreement"] == pytest.approx(agreed / len(sampled))
        assert row["latency_s"]["count"] == len(sampled)
        # Every call is the active version's inference; none is counted for the candidate.
        total = server.api(
            "GET", f"/v1/models/{MODEL}/versions/1.0.0/metrics", params={"by": "none"}
        )["total"]
        assert total["inferences"] == CALLS
        shown = server.cli("metrics", MODEL, "1.0.0")
        assert shown.returncode == 0, shown.stderr
        assert (
            "shadow candidates" in shown.stdout
            and f"{100 * agreed / len(sampled):.2f}%" in shown.stdout
        )
        print(
            f"\nshadow e2e: {CALLS} calls, {len(sampled)} sampled at {FRACTION}, agreed {agreed}"
            f" ({agreed / len(sampled):.3f}), server: sampled {row['sampled']} compared"
            f" {row['compared']} agreed {row['agreed']} dropped {row['dropped']}"
        )
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
