"""Agent.predict against a bare ONNX Runtime InferenceSession.run, in one run.

Trains the wearable 1D-CNN example, exports its float ONNX graph with the converter, builds a
signed float bundle with the converter's reference histograms and self-test, installs it in a
real :class:`~device_agent.agent.Agent` (enrolled and checked in against an in-process fleet
server on SQLite), then times single-sample calls with one ONNX Runtime thread, interleaving the
variants in blocks so they share the machine's state:

- ``InferenceSession.run``: the baseline, ``session.run(None, {"input": x})``;
- ``C++ session run``: ONNX Runtime's binding without its Python feed validation, which the
  agent's own schema check replaces (shows where the headroom comes from);
- ``Agent.predict``: input check, ORT run, telemetry (buffers, and their vectorised aggregation
  and SQLite writes every ``telemetry_flush_every`` calls, which the mean includes);
- ``Agent.predict, shadow``: a second agent in a shadow rollout of version 2.0.0 (the same graph
  in another bundle) at ``--shadow-fraction``; the sampling is seeded, so the bench knows which
  calls were sampled and reports the unsampled ones (the target) apart from the sampled ones
  (whose candidate runs on the agent's shadow thread, not the caller's).

    python bench/bench_agent.py [--rounds 40] [--block 500] [--shadow-fraction 0.05] [--json]
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converters import bundling, reference  # noqa: E402
from converters.onnx_export import export  # noqa: E402
from converters.sources import load_data, load_model  # noqa: E402
from firmware_bundles import SigningKey, build  # noqa: E402
from firmware_bundles.catalogue import TargetCatalogue  # noqa: E402

MODEL = "wrist-activity"
TARGET = "phone-android"
TARGET_MEDIAN_RATIO = 1.10
SHADOW_SEED = 15
DEFAULT_OUT = REPO / "build" / "bench-agent"
SHADOW = "Agent.predict, shadow"


@dataclass(frozen=True)
class FloatBundle:
    """The float wearable CNN as ONNX bytes, a signed bundle of it, and eval inputs."""

    model: bytes
    bundle: bytes
    samples: np.ndarray
    key: SigningKey
    #: The same graph as version 2.0.0 (release counter 2), the shadow candidate.
    candidate: bytes


def float_bundle(work: Path) -> FloatBundle:
    """Train the example, export float ONNX, and pack a signed float32 bundle of it."""
    data = work / "wearable"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_wearable_cnn.py"), "--out", str(data)],
        check=True,
        capture_output=True,
    )
    train, held_out = load_data(data / "train.npz"), load_data(data / "eval.npz")
    exported = export(load_model(data / "model.pt2"), train)
    inputs, outputs = bundling.tensor_specs(exported.model, class_labels=exported.class_labels)
    train_out = np.asarray(
        _session(exported.model).run(None, {"input": train.x})[0], dtype=np.float32
    )
    target = TargetCatalogue.load_default().get(TARGET)
    # Format 2: reference histograms as JSON in the manifest, self-test vectors in a file.
    self_test, vectors = bundling.self_test(exported.model, held_out.x, "float32")
    draft = {
        "format": 2,
        "name": MODEL,
        "version": "1.0.0",
        "release_counter": 1,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "task": exported.task,
        "targets": [bundling.target_ref(target)],
        "runtime": {
            "model_file": "model.onnx",
            "format": "onnx",
            "opset": 18,
            "op_types": sorted({n.op_type for n in _graph(exported.model).node}),
            "min_onnxruntime": "1.20.0",
            "precision": "float32",
            "ram_estimate": {"bytes": 1 << 20, "method": "bench"},
        },
        "inputs": inputs,
        "outputs": outputs,
        "quantisation": {"scheme": "float32", "quantised_ops": 0},
        "metrics": {"accuracy": 1.0},
        "reference_histograms": {
            "inputs": reference.input_histograms(train.x),
            "outputs": reference.output_histograms(
                exported.task, train_out, exported.class_labels, exported.output_name
            ),
        },
        "self_test": self_test,
        "provenance": {"source_model_sha256": train.sha256, "builder": "bench_agent"},
    }
    key = SigningKey.generate()
    later = {**copy.deepcopy(draft), "version": "2.0.0", "release_counter": 2}
    files = {"model.onnx": exported.model, self_test["file"]: vectors}
    bundle = build(draft, files, [key])
    candidate = build(later, files, [key])
    return FloatBundle(exported.model, bundle, held_out.x[:64].copy(), key, candidate)


def _graph(model: bytes) -> Any:
    import onnx

    return onnx.load_from_string(model).graph


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved(
    variants: dict[str, Callable[[np.ndarray], Any]],
    samples: np.ndarray,
    rounds: int,
    block: int,
    warmup: int,
) -> dict[str, np.ndarray]:
    """Per-call times (ns) of each variant, measured in alternating blocks of ``block`` calls."""
    rows = [samples[i : i + 1] for i in range(len(samples))]
    for fn in variants.values():
        for i in range(warmup):
            fn(rows[i % len(rows)])
    times = {name: np.empty(rounds * block, np.int64) for name in variants}
    names = list(variants)
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn, out = variants[name], times[name]
            base = r * block
            for i in range(block):
                x = rows[i % len(rows)]
                start = clock()
                fn(x)
                out[base + i] = clock() - start
    return times


def main(
    rounds: Annotated[int, typer.Option(help="Blocks per variant.")] = 40,
    block: Annotated[int, typer.Option(help="Calls per block.")] = 500,
    warmup: Annotated[int, typer.Option(help="Untimed calls per variant first.")] = 2000,
    out: Annotated[Path, typer.Option(help="Where the example trains.")] = DEFAULT_OUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    shadow_fraction: Annotated[
        float, typer.Option(help="Share of the shadow agent's calls its candidate samples.")
    ] = 0.05,
) -> None:
    """Agent.predict vs bare InferenceSession.run on the float wearable 1D-CNN, same run.

    Exits 1 when Agent.predict's median, or its median on the calls a shadow did not sample, is
    over 1.10 times the bare median.
    """
    out.mkdir(parents=True, exist_ok=True)
    built = float_bundle(out)
    session = _session(built.model)
    binding = session._sess
    with tempfile.TemporaryDirectory() as tmp:
        agents = agent_predict(built, Path(tmp), shadow_fraction)
        variants: dict[str, Callable[[np.ndarray], Any]] = {
            "InferenceSession.run": lambda x: session.run(None, {"input": x}),
            "C++ session run": lambda x: binding.run(["probabilities"], {"input": x}, None),
            "Agent.predict": agents.predict,
            SHADOW: agents.shadow_predict,
        }
        times = interleaved(variants, built.samples, rounds, block, warmup)
        sampled = agents.sampled()
        agents.close()
    # The agent draws once per call, warm-up calls first, with the bench's seed.
    draw = random.Random(SHADOW_SEED).random
    picked = np.array([draw() < shadow_fraction for _ in range(warmup + rounds * block)])
    if int(picked.sum()) != sampled:
        raise RuntimeError(f"the agent sampled {sampled} calls, the seed says {picked.sum()}")
    shadowed = times.pop(SHADOW)
    times[f"{SHADOW}, unsampled calls"] = shadowed[~picked[warmup:]]
    times[f"{SHADOW}, sampled calls"] = shadowed[picked[warmup:]]
    results = summarise(times, "InferenceSession.run")
    by_name = {r["variant"]: r for r in results}
    ratios = [
        float(by_name[name]["median_ratio"])
        for name in ("Agent.predict", f"{SHADOW}, unsampled calls")
    ]
    ok = max(ratios) <= TARGET_MEDIAN_RATIO
    how = agents.how
    if as_json:
        report = {"path": how, "target_median_ratio": TARGET_MEDIAN_RATIO, "ok": ok}
        print(json.dumps({**report, "results": results}))
    else:
        _table(results, how, ok)
    raise typer.Exit(0 if ok else 1)


def summarise(times: dict[str, np.ndarray], baseline: str) -> list[dict[str, Any]]:
    """Median, mean and p99 per variant in µs, with ratio and overhead against ``baseline``."""
    base = times[baseline]
    base_median, base_mean = float(np.median(base)) / 1e3, float(base.mean()) / 1e3
    results: list[dict[str, Any]] = []
    for name, ns in times.items():
        median, mean = float(np.median(ns)) / 1e3, float(ns.mean()) / 1e3
        results.append(
            {
                "variant": name,
                "calls": int(ns.size),
                "median_us": round(median, 3),
                "mean_us": round(mean, 3),
                "p99_us": round(float(np.percentile(ns, 99)) / 1e3, 3),
                "median_ratio": round(median / base_median, 4),
                "mean_ratio": round(mean / base_mean, 4),
                "median_overhead_us": round(median - base_median, 3),
                "mean_overhead_us": round(mean - base_mean, 3),
            }
        )
    return results


def _table(results: list[dict[str, Any]], how: str, ok: bool) -> None:
    table = Table(
        title="Agent.predict vs bare InferenceSession.run"
        " (float wearable 1D-CNN, 1 sample, 1 ORT thread, same run)"
    )
    columns = (
        "variant",
        "calls",
        "median µs",
        "mean µs",
        "p99 µs",
        "ratio median",
        "ratio mean",
        "overhead median µs",
        "overhead mean µs",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in results:
        table.add_row(
            r["variant"],
            str(r["calls"]),
            f"{r['median_us']:.2f}",
            f"{r['mean_us']:.2f}",
            f"{r['p99_us']:.2f}",
            f"{r['median_ratio']:.3f}",
            f"{r['mean_ratio']:.3f}",
            f"{r['median_overhead_us']:+.2f}",
            f"{r['mean_overhead_us']:+.2f}",
        )
    console = Console(width=160)
    console.print(table)
    console.print(f"Agent path: {how}.")
    verdict = "met" if ok else "NOT met"
    console.print(
        f"Target: median ratio <= {TARGET_MEDIAN_RATIO:.2f} for Agent.predict and for the shadow"
        f" agent's unsampled calls: {verdict}."
    )


@dataclass
class Agents:
    """The two agents' predict calls, the shadow agent's sampled-call count, and a closer."""

    predict: Callable[[np.ndarray], Any]
    shadow_predict: Callable[[np.ndarray], Any]
    sampled: Callable[[], int]
    close: Callable[[], None]
    how: str


def agent_predict(built: FloatBundle, work: Path, shadow_fraction: float) -> Agents:
    """Two real Agents with the float bundle installed the way a device gets it: one plain,
    one whose next check-in put version 2.0.0 in its shadow slot (a shadow rollout).

    An in-process fleet server (SQLite, the FastAPI app behind Starlette's TestClient, which is
    an httpx client) publishes and releases the bundle; each agent enrolls, checks in,
    downloads, verifies, installs and self-tests it, then predicts offline from its active slot.
    """
    from fastapi.testclient import TestClient

    from device_agent.agent import Agent
    from device_agent.config import AgentSettings
    from firmware_bundles import new_root, sign_root
    from server.app import build_state, create_app, ensure_admin_token
    from server.config import Settings
    from server.db import upgrade

    keys = {role: SigningKey.generate() for role in ("root", "director", "hil")}
    root = new_root(
        version=1,
        expires=datetime.now(UTC) + timedelta(days=30),
        role_keys={
            "root": [keys["root"].public],
            "release": [built.key.public],
            "director": [keys["director"].public],
            "hil": [keys["hil"].public],
        },
        thresholds={},
    )
    data = work / "server"
    (data / "keys").mkdir(parents=True)
    (data / "root.json").write_bytes(sign_root(root, [keys["root"]]).to_bytes())
    (data / "keys" / "director.pem").write_bytes(keys["director"].to_pem())
    url = f"sqlite:///{data / 'fleet.db'}"
    upgrade(url)
    state = build_state(Settings(data_dir=data, database_url=url))
    admin = ensure_admin_token(state)
    client = TestClient(create_app(state))
    client.__enter__()

    def call(method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    tokens = {
        role: call("POST", "/v1/tokens", admin, json={"name": role, "role": role})["token"]
        for role in ("publisher", "operator")
    }
    call("POST", "/v1/bundles", tokens["publisher"], content=built.bundle)
    call("POST", "/v1/bundles", tokens["publisher"], content=built.candidate)
    call("POST", f"/v1/models/{MODEL}/versions/1.0.0/release", tokens["operator"], json={})
    enroll = call("POST", "/v1/enrollment-tokens", tokens["operator"], json={"max_uses": 2})

    def installed_agent(name: str) -> Agent:
        settings = AgentSettings(
            server_url=str(client.base_url),
            state_dir=work / name,
            root_path=data / "root.json",
            hardware_id=TARGET,
            enroll_token=enroll["token"],
            ort_threads=1,
            shadow_seed=SHADOW_SEED,
        )
        agent = Agent(settings, http=client)
        agent.enroll()
        installed = agent.check_in()
        if agent.models() != [MODEL]:
            raise RuntimeError(f"the agent did not install {MODEL}: {installed}")
        return agent

    plain = installed_agent("agent")
    plan = {
        "model": MODEL,
        "version": "2.0.0",
        "stages": [{"percent": 100}],
        "shadow": {"sample_fraction": shadow_fraction},
    }
    call("POST", "/v1/rollouts", tokens["operator"], json=plan)
    # Checked in after the rollout began (the plain agent never checks in again).
    shadowed = installed_agent("shadow-agent")
    shadow = shadowed.status()["models"][MODEL]["shadow"]
    if not shadow or shadow["version"] != "2.0.0":
        raise RuntimeError(f"the shadow agent has no candidate in shadow: {shadow}")

    def close() -> None:
        plain.close()
        shadowed.close()
        client.__exit__(None, None, None)
        state.engine.dispose()

    how = (
        "Agent.predict (enrolled, checked in, bundle verified, installed, self-tested); shadow:"
        f" 2.0.0 in the shadow slot, {shadow_fraction:g} of calls sampled"
    )
    return Agents(
        predict=lambda x: plain.predict(MODEL, x),
        shadow_predict=lambda x: shadowed.predict(MODEL, x),
        sampled=lambda: shadowed._shadow.sampled,
        close=close,
        how=how,
    )


if __name__ == "__main__":
    typer.run(main)
