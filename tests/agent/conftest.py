"""Fixtures for the agent tests: real ONNX bundles signed by the test keys, a FleetSimulator, and
agents on a fake clock shared with the simulator.

The model is a real linear classifier (MatMul + Add + Softmax on 4 features, 3 classes) built
with onnx.helper; its self-test vectors are what ONNX Runtime computes, so a bundle passes its
self-test on a correct runtime and a bundle whose vectors were altered fails it. Versions differ
in their weights, so a prediction tells which version answered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import AgentSettings
from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel
from firmware_bundles import SigningKey, build
from tests.agent import onnx_models as m
from tests.agent.simulator import FakeClock, FleetSimulator
from tests.conftest import NOW, Keys, classifier_draft, onnx_runtime, target_entry

MODEL = "gesture"
OTHER_MODEL = "keyword"
FEATURES = 4
CLASSES = ["rest", "tap", "swipe"]
#: The input tests predict on to tell which version answers.
PROBE = np.array([[0.5, -1.0, 0.25, 2.0]], dtype=np.float32)


def linear_model(seed: int) -> bytes:
    """input [N, 4] -> MatMul -> Add -> Softmax -> probabilities [N, 3], weights from ``seed``."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, (FEATURES, len(CLASSES))).astype(np.float32)
    bias = rng.normal(0, 0.5, len(CLASSES)).astype(np.float32)
    return m.dense_softmax([(weights, bias)], "linear")


def run_onnx(model_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    return m.ort_run(model_bytes, {"input": inputs})[0]


@dataclass(frozen=True)
class BuiltBundle:
    """A built bundle and what tests need to know about it."""

    data: bytes
    version: str
    release_counter: int
    model_bytes: bytes

    @property
    def bundle_sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def expected(self, inputs: np.ndarray = PROBE) -> np.ndarray:
        """The probabilities ONNX Runtime gives on this version's model."""
        return run_onnx(self.model_bytes, inputs)


def make_bundle(
    keys: list[SigningKey],
    *,
    version: str,
    counter: int,
    seed: int,
    target: str = "phone-android",
    selftest_ok: bool = True,
    padding_bytes: int = 0,
    name: str = MODEL,
) -> BuiltBundle:
    """A signed bundle of the linear model, with self-test vectors computed by ONNX Runtime.

    ``selftest_ok=False`` shifts the expected outputs by 0.2, so the self-test must fail.
    ``padding_bytes`` adds a data file, to make downloads long enough to interrupt.
    """
    model = linear_model(seed)
    vectors = np.random.default_rng(7).normal(0, 1, (3, 1, FEATURES)).astype(np.float32)
    shift = 0.0 if selftest_ok else 0.2
    feature_names = [f"f{i}" for i in range(FEATURES)]
    draft = classifier_draft(
        model,
        classes=CLASSES,
        features=FEATURES,
        feature_names=feature_names,
        vectors=[(x.tolist(), (run_onnx(model, x) + shift).tolist()) for x in vectors],
        tolerance=1e-5,
        input_histograms=[
            {"name": f, "kind": "numeric", "edges": [-1.0, 0.0, 1.0], "counts": [1] * 4}
            for f in feature_names
        ],
        label_counts=[1] * 4,
        name=name,
        version=version,
        release_counter=counter,
        targets=[target_entry(target)],
        runtime=onnx_runtime(method="weights + activations"),
        accuracy=0.9,
    )
    files = {"model.onnx": model}
    if padding_bytes:
        files["padding.bin"] = np.random.default_rng(seed).bytes(padding_bytes)
    return BuiltBundle(build(draft, files, keys), version, counter, model)


@dataclass(frozen=True)
class Bundles:
    v1: BuiltBundle
    v2: BuiltBundle
    v3: BuiltBundle
    ring: BuiltBundle
    bad_selftest: BuiltBundle
    one_signature: BuiltBundle
    #: v1 of a second model (:data:`OTHER_MODEL`), for sets that assign two.
    other: BuiltBundle


@pytest.fixture(scope="session")
def bundles(keys: Keys) -> Bundles:
    return Bundles(
        v1=make_bundle(keys.release, version="1.0.0", counter=1, seed=1),
        v2=make_bundle(keys.release, version="2.0.0", counter=2, seed=2),
        v3=make_bundle(keys.release, version="3.0.0", counter=3, seed=3, padding_bytes=20_000),
        ring=make_bundle(keys.release, version="2.0.0", counter=2, seed=2, target="ring-gen3"),
        bad_selftest=make_bundle(
            keys.release, version="2.0.0", counter=2, seed=2, selftest_ok=False
        ),
        one_signature=make_bundle(keys.release[:1], version="2.0.0", counter=2, seed=2),
        other=make_bundle(keys.release, version="1.0.0", counter=1, seed=4, name=OTHER_MODEL),
    )


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """A telemetry outbox of 1 MiB at ``tmp_path/outbox.sqlite``, closed afterwards."""
    box = Outbox(tmp_path / "outbox.sqlite", 1 << 20)
    yield box
    box.close()


@pytest.fixture(scope="module")
def classifier() -> LoadedModel:
    """The hand-checkable classifier of :mod:`tests.agent.onnx_models`, loaded."""
    return m.load(m.classifier(), m.classifier_manifest())


@pytest.fixture(scope="session")
def root_bytes(keys: Keys) -> bytes:
    return keys.make_root()[1].to_bytes()


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture()
def sim(keys: Keys, root_bytes: bytes, clock: FakeClock) -> FleetSimulator:
    return FleetSimulator(keys.director[0], root_bytes, clock)


AgentFactory = Callable[..., Agent]


@pytest.fixture()
def make_agent(
    tmp_path: Path, sim: FleetSimulator, clock: FakeClock, root_bytes: bytes
) -> Iterator[AgentFactory]:
    """Builds agents on ``tmp_path/state`` talking to the simulator; closes them afterwards.

    Keyword arguments override settings. A second agent on the same state dir is what the
    device sees after a restart. ``close_at_teardown=False`` is for an agent frozen by the
    ``test_pause_at`` hook, whose lock a sleeping thread holds.
    """
    root_path = tmp_path / "root.json"
    root_path.write_bytes(root_bytes)
    made: list[Agent] = []

    def factory(*, close_at_teardown: bool = True, **overrides: Any) -> Agent:
        values: dict[str, Any] = {
            "server_url": sim.base_url,
            "state_dir": tmp_path / "state",
            "root_path": root_path,
            "hardware_id": "phone-android",
            "enroll_token": "efe_simulated",
            "firmware_version": "14.0.0",
            "backoff_initial_s": 0.0,
            "max_download_attempts": 3,
            **overrides,
        }
        agent = Agent(AgentSettings(**values), http=sim.client(), clock=clock)
        if close_at_teardown:
            made.append(agent)
        return agent

    yield factory
    for agent in made:
        agent.close()


@pytest.fixture()
def installed(make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles) -> Agent:
    """An agent that enrolled and installed v1 from the simulator."""
    sim.assign(MODEL, bundles.v1.data)
    agent = make_agent()
    result = agent.check_in()
    assert [r.action for r in result.installs] == ["installed"], result
    return agent


def assert_answers(agent: Agent, bundle: BuiltBundle) -> None:
    """``agent`` predicts with ``bundle``'s model (so that version is the one running)."""
    outputs = agent.predict(MODEL, PROBE)
    np.testing.assert_allclose(outputs["probabilities"], bundle.expected(), rtol=1e-6)
