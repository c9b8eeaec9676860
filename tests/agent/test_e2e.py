"""End to end through real processes: `edgefleet serve` (uvicorn on loopback) and `edgefleet agent
run`, a real ONNX bundle published and released, predictions through the agent's socket, and the
telemetry they make arriving on the server with the exact count."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.local_api import LocalApiClient, LocalApiError, socket_path
from firmware_bundles import SigningKey
from tests.agent.e2e_bundles import MODEL, PROBE, E2EBundle, build_bundle
from tests.procs import AgentProcess, ServerProcess, cli, wait_for


def agent_settings(server: ServerProcess, state_dir: Path, enroll_token: str) -> dict[str, str]:
    """Settings for a quick agent: short intervals, one-second telemetry windows."""
    return {
        "server_url": server.url,
        "state_dir": str(state_dir),
        "root_path": str(server.data_dir / "root.json"),
        "hardware_id": "phone-android",
        "enroll_token": enroll_token,
        "check_in_interval_s": "0.3",
        "check_in_jitter": "0.1",
        "backoff_initial_s": "0.1",
        "backoff_max_s": "0.5",
        "http_timeout_s": "5",
        "stall_timeout_s": "5",
        "telemetry_window_s": "1",
        "telemetry_flush_every": "4",
    }


def rollup_count(server: ServerProcess, model: str = MODEL) -> int:
    rollups = server.api("GET", "/v1/telemetry/rollups", params={"model": model})
    return sum(int(r["inference_count"]) for r in rollups)


def active_version(agent: AgentProcess, model: str = MODEL) -> str | None:
    models = agent.status()["models"]
    entry = models.get(model) or {}
    return entry.get("version") if entry.get("active_slot") else None


@dataclass
class Fleet:
    server: ServerProcess
    agent: AgentProcess
    v1: E2EBundle
    tmp: Path


@contextmanager
def agent_on_v1(tmp: Path) -> Iterator[tuple[ServerProcess, AgentProcess, SigningKey, E2EBundle]]:
    """A real server with version 1 released, and a real agent that has installed it."""
    server = ServerProcess(data_dir=tmp / "data", log_dir=tmp)
    agent: AgentProcess | None = None
    try:
        server.start()
        key = server.release_key
        v1 = build_bundle(tmp, key, version="1.0.0", release_counter=1, seed=1)
        server.publish_and_release(v1.path, MODEL, "1.0.0")
        settings = agent_settings(server, tmp / "state", server.enroll_token())
        agent = AgentProcess(tmp / "state", tmp, settings).start()
        running = agent
        wait_for(lambda: active_version(running) == "1.0.0", "version 1.0.0 to be active")
        yield server, agent, key, v1
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("e2e")
    with agent_on_v1(tmp) as (server, agent, _, v1):
        yield Fleet(server, agent, v1, tmp)


def test_enroll_install_predict_and_exact_telemetry(fleet: Fleet) -> None:
    agent, server, tmp = fleet.agent, fleet.server, fleet.tmp
    expected = fleet.v1.expected(PROBE)
    made = 0

    # `edgefleet agent predict` through the socket: .npy, .json lists, .json by input name.
    np.save(tmp / "probe.npy", PROBE)
    (tmp / "probe.json").write_text(json.dumps(PROBE.tolist()))
    (tmp / "named.json").write_text(json.dumps({"input": PROBE.tolist()}))
    for name in ("probe.npy", "probe.json", "named.json"):
        done = agent.agent_cli("predict", MODEL, "--input", str(tmp / name), "--json")
        assert done.returncode == 0, done.stderr
        outputs = json.loads(done.stdout)
        np.testing.assert_allclose(outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)
        made += 1
    table = agent.agent_cli("predict", MODEL, "--input", str(tmp / "probe.npy"))
    assert table.returncode == 0 and "probabilities" in table.stdout
    made += 1

    # An app on the device talking to the socket directly, a batch of 5 rows per call (a call
    # is one inference in telemetry; its rows go to the histograms).
    client = LocalApiClient(socket_path(agent.state_dir))
    batch = np.random.default_rng(0).normal(0, 1, (5, PROBE.shape[1])).astype(np.float32)
    for _ in range(6):
        got = client.predict(MODEL, batch)
        np.testing.assert_allclose(got["probabilities"], fleet.v1.expected(batch), atol=1e-6)
        made += 1
    for _ in range(20):
        client.predict(MODEL, PROBE)
        made += 1

    status = agent.status()
    entry = status["models"][MODEL]
    assert entry["version"] == "1.0.0" and entry["last_install"] == "ok"
    assert entry["bundle_sha256"] == fleet.v1.bundle_sha256()
    text = agent.agent_cli("status")
    assert text.returncode == 0 and MODEL in text.stdout and "1.0.0" in text.stdout

    # Every inference is counted once on the server (windows are 1 s; the agent uploads as they
    # close), and no more arrive later.
    wait_for(lambda: rollup_count(server) == made, f"{made} inferences in the rollups")
    wait_for(
        lambda: (
            agent.status()["outbox"]["open_windows"] == 0
            and agent.status()["outbox"]["closed_windows"] == 0
        ),
        "the outbox to drain",
    )
    assert rollup_count(server) == made

    # What the agent logged: enrollment, the install, uploads that carried windows.
    installs = agent.events("install")
    assert [(e["action"], e["version"]) for e in installs] == [("installed", "1.0.0")]
    assert agent.events("enrolled")
    assert sum(e.get("windows_sent", 0) for e in agent.events("upload")) > 0
    assert all(e["outcome"] == "ok" for e in agent.events("check-in"))

    # Private files.
    assert stat.S_IMODE(os.stat(socket_path(agent.state_dir)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(agent.state_dir / "credentials.json").st_mode) == 0o600


def _raw(path: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(line)
        with sock.makefile("rb") as reader:
            answer: dict[str, Any] = json.loads(reader.readline())
            return answer


@pytest.mark.parametrize(
    ("line", "error_type", "message"),
    [
        (b"not json\n", "BadRequest", "not JSON"),
        (b"[1, 2]\n", "BadRequest", "must be a JSON object"),
        (b'{"op": "reboot"}\n', "BadRequest", "unknown op 'reboot'"),
        (b'{"op": "predict", "inputs": [[0]]}\n', "BadRequest", "needs the field 'model'"),
        (b'{"op": "predict", "model": 3, "inputs": [[0]]}\n', "BadRequest", "'model' must be"),
        (b'{"op": "predict", "model": "nope", "inputs": [[0]]}\n', "UnknownModelError", "nope"),
        (
            b'{"op": "predict", "model": "e2e-activity", "inputs": [[1, 2, 3]]}\n',
            "InputError",
            "input",
        ),
        (b'{"op": "feedback", "model": "nope", "kind": "up"}\n', "UnknownModelError", "nope"),
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-op",
        "missing-model",
        "model-not-string",
        "unknown-model",
        "wrong-feature-count",
        "feedback-unknown-model",
    ],
)
def test_local_api_answers_bad_requests_with_typed_errors(
    fleet: Fleet, line: bytes, error_type: str, message: str
) -> None:
    answer = _raw(socket_path(fleet.agent.state_dir), line)
    assert answer["ok"] is False
    assert answer["error"]["type"] == error_type
    assert message in answer["error"]["message"]


def test_local_api_keeps_a_connection_for_several_requests(fleet: Fleet) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path(fleet.agent.state_dir)))
        request = {"op": "predict", "model": MODEL, "inputs": PROBE.tolist()}
        sock.sendall(b"garbage\n" + json.dumps(request).encode() + b'\n{"op": "status"}\n')
        with sock.makefile("rb") as reader:
            answers = [json.loads(reader.readline()) for _ in range(3)]
    assert [a["ok"] for a in answers] == [False, True, True]
    np.testing.assert_allclose(
        answers[1]["result"]["outputs"]["probabilities"], fleet.v1.expected(PROBE), atol=1e-6
    )
    assert answers[2]["result"]["models"][MODEL]["version"] == "1.0.0"


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("file_name", "content", "code", "message"),
    [
        ("missing.json", None, 2, "does not exist"),
        ("inputs.txt", b"[[0]]", 2, "expected a .json or .npy file"),
        ("broken.json", b"[[0.1, ", 2, "is not valid JSON"),
        ("scalar.json", b"3", 2, "expected a list or an object"),
        ("broken.npy", b"\x93NUMPY garbage", 2, "is not a readable .npy array"),
        ("strings.npy", _npy(np.array(["a", "b"])), 2, "expected a numeric array"),
        ("three.json", b"[[0.1, 0.2, 0.3]]", 1, "expected"),
        ("wrong-name.json", b'{"x": [[0, 0, 0, 0, 0, 0, 0, 0]]}', 1, "input"),
    ],
    ids=[
        "missing-file",
        "wrong-suffix",
        "bad-json",
        "json-scalar",
        "bad-npy",
        "npy-strings",
        "wrong-feature-count",
        "wrong-input-name",
    ],
)
def test_predict_cli_names_bad_input(
    fleet: Fleet, file_name: str, content: bytes | None, code: int, message: str
) -> None:
    path = fleet.tmp / file_name
    if content is not None:
        path.write_bytes(content)
    done = fleet.agent.agent_cli("predict", MODEL, "--input", str(path))
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_predict_cli_unknown_model(fleet: Fleet) -> None:
    path = _write(fleet.tmp, "ok.json", json.dumps(PROBE.tolist()).encode())
    done = fleet.agent.agent_cli("predict", "no-such-model", "--input", str(path))
    assert done.returncode == 1
    assert "no active model 'no-such-model'" in done.stderr and MODEL in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["status"], ["predict", MODEL, "--input", "x.json"]])
def test_cli_without_a_running_agent_says_how_to_start_one(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "x.json").write_text("[[0]]")
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", *command, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    assert f"no agent socket at {tmp_path / 'agent.sock'}" in done.stderr.replace("\n", "")
    assert "start one with `edgefleet agent run`" in done.stderr.replace("\n", "")
    assert "Traceback" not in done.stderr


def test_second_agent_on_the_same_state_dir_is_refused(fleet: Fleet) -> None:
    done = cli(
        "agent",
        "run",
        "--server",
        fleet.server.url,
        "--root",
        str(fleet.server.data_dir / "root.json"),
        "--target",
        "phone-android",
        "--state-dir",
        str(fleet.agent.state_dir),
    )
    assert done.returncode == 1
    assert "another agent is already running" in done.stderr
    assert fleet.agent.alive()
    assert LocalApiClient(socket_path(fleet.agent.state_dir)).status()["device_id"]


def test_a_refused_enrollment_token_stops_the_agent_with_the_reason(fleet: Fleet) -> None:
    state = fleet.tmp / "refused"
    settings = {
        **agent_settings(fleet.server, state, "eft_not-a-token"),
        "device_id": "phone-refused",
    }
    refused = AgentProcess(state, fleet.tmp / "refused-logs", settings)
    refused.log_dir.mkdir()
    refused.start()
    try:
        assert refused.proc is not None and refused.proc.wait(timeout=60) == 2
    finally:
        refused.stop()
    error = refused.events("error")[-1]
    assert error["step"] == "enroll" and error["type"] == "AuthError"
    assert not (state / "credentials.json").exists()


def test_sigterm_stops_cleanly_and_a_restart_serves_at_once(fleet: Fleet) -> None:
    """Runs last in this module: stops the shared agent and starts it again, offline."""
    agent = fleet.agent
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=30) == 0
    agent.stop()
    assert agent.events("stopped")[-1]["code"] == 0
    assert not socket_path(agent.state_dir).exists()
    # Restart against a server that is not there: the installed model answers without network.
    agent.start(server_url="http://127.0.0.1:9")
    client = LocalApiClient(socket_path(agent.state_dir))
    wait_for(lambda: client.status()["device_id"], "the restarted agent's socket")
    got = client.predict(MODEL, PROBE)
    np.testing.assert_allclose(got["probabilities"], fleet.v1.expected(PROBE), atol=1e-6)
    wait_for(lambda: agent.events("backoff"), "a backoff event while the server is unreachable")
    with pytest.raises(LocalApiError, match="no active model 'other'"):
        client.predict("other", PROBE)


#: Settings `agent run` accepts (a row below adds one bad setting to them).
AGENT_ARGS = ["--server", "http://x", "--root", "r.json", "--hardware-id", "phone-android"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--root", "r.json", "--hardware-id", "phone-android"], 2, "missing --server"),
        (["--server", "http://x", "--hardware-id", "phone-android"], 2, "missing --root"),
        (["--server", "http://x", "--root", "r.json"], 2, "missing --hardware-id"),
        (
            [*AGENT_ARGS, "--target", "ring-gen3"],
            2,
            "--target is the old spelling of --hardware-id: give one of them",
        ),
        (
            [*AGENT_ARGS, "--check-in-interval-s", "0"],
            2,
            "--check-in-interval-s: Input should be greater than 0",
        ),
        (
            [*AGENT_ARGS, "--backoff-initial-s", "10", "--backoff-max-s", "1"],
            2,
            "backoff_max_s must be at least backoff_initial_s",
        ),
        (
            [*AGENT_ARGS, "--test-pause-at", "reboot"],
            2,
            "--test-pause-at: Input should be",
        ),
        (
            ["--server", "http://x", "--root", "missing.json", "--hardware-id", "phone-android"],
            1,
            "pinned root missing.json",
        ),
        (["--server", "http://x", "--root", "r.json", "--target", "toaster"], 1, "toaster"),
    ],
    ids=[
        "no-server",
        "no-root",
        "no-target",
        "target-twice",
        "interval-zero",
        "backoff-inverted",
        "unknown-pause-step",
        "root-file-missing",
        "unknown-target",
    ],
)
def test_agent_run_names_bad_settings(
    tmp_path: Path, keys: Any, args: list[str], code: int, message: str
) -> None:
    _, envelope = keys.make_root()
    (tmp_path / "r.json").write_bytes(envelope.to_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", "run", *args, "--state-dir", "st"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "COLUMNS": "300"},
        check=False,
        timeout=60,
    )
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_agent_run_has_an_option_for_every_setting() -> None:
    from typer.main import get_command

    from device_agent.config import AgentSettings
    from edgefleet.cli import app

    command = get_command(app).commands["agent"].commands["run"]  # type: ignore[attr-defined]
    envvars = {p.envvar for p in command.params if not p.hidden}
    assert {f"EDGEFLEET_AGENT_{f.upper()}" for f in AgentSettings.model_fields} == envvars
    # The spelling --hardware-id had before stays accepted, flag and variable, unlisted.
    old = {p.envvar: p.opts for p in command.params if p.hidden}
    assert old == {"EDGEFLEET_AGENT_TARGET_ID": ["--target"]}
