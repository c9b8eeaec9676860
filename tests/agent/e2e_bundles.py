"""Real ONNX bundles for the end-to-end tests: a small MLP built with onnx.helper, its self-test
vectors computed by ONNX Runtime, signed with the server's release key.

Versions differ in their weights (seeded), so a test can tell from a prediction which version
answered. The hidden layer makes the bundle about 140 KB: large enough that a download paused at
half its bytes has a real Range to resume, small enough to keep the tests quick.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from firmware_bundles import SigningKey, build
from tests.agent.onnx_models import dense_softmax, ort_run
from tests.conftest import classifier_draft, onnx_runtime

MODEL = "e2e-activity"
FEATURES = 8
HIDDEN = 4096
CLASSES = ["rest", "walk", "run"]
#: Inputs the tests predict on (fixed, so expected outputs can be computed in the test).
PROBE = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32).reshape(1, FEATURES)


@dataclass(frozen=True)
class E2EBundle:
    """One built bundle and what a test needs to know about it."""

    path: Path
    version: str
    release_counter: int
    model_bytes: bytes
    length: int

    def bundle_sha256(self) -> str:
        """The bundle's identity (SHA-256 of its bytes)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def expected(self, inputs: np.ndarray) -> np.ndarray:
        """The probabilities ONNX Runtime gives for ``inputs`` on this version's model."""
        return ort_run(self.model_bytes, {"input": inputs})[0]


def onnx_model(seed: int) -> bytes:
    """input [N, 8] -> MatMul -> Add -> Relu -> MatMul -> Add -> Softmax -> probabilities."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (FEATURES, HIDDEN)).astype(np.float32)
    b1 = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    w2 = rng.normal(0, 0.05, (HIDDEN, len(CLASSES))).astype(np.float32)
    b2 = rng.normal(0, 0.1, len(CLASSES)).astype(np.float32)
    return dense_softmax([(w1, b1), (w2, b2)], "e2e_mlp")


def _draft(model: bytes, version: str, counter: int) -> dict[str, Any]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    vectors_in = np.random.default_rng(99).normal(0, 1, (3, 1, FEATURES)).astype(np.float32)
    names = [f"f{i}" for i in range(FEATURES)]
    return classifier_draft(
        model,
        classes=CLASSES,
        features=FEATURES,
        feature_names=names,
        vectors=[(x.tolist(), session.run(None, {"input": x})[0].tolist()) for x in vectors_in],
        input_histograms=[
            {"name": n, "kind": "numeric", "edges": [-0.5, 0.0, 0.5], "counts": [1, 2, 2, 1]}
            for n in names
        ],
        label_counts=[3, 3, 3, 0],
        name=MODEL,
        version=version,
        release_counter=counter,
        runtime=onnx_runtime(
            ("Add", "MatMul", "Relu", "Softmax"),
            ram_bytes=len(model) + HIDDEN * 8,
            method="weights + activations",
        ),
        accuracy=0.9,
    )


def build_bundle(
    out_dir: Path, release_key: SigningKey, *, version: str, release_counter: int, seed: int
) -> E2EBundle:
    """Build, sign and write ``<out_dir>/<model>-<version>.efb``."""
    model = onnx_model(seed)
    data = build(_draft(model, version, release_counter), {"model.onnx": model}, [release_key])
    path = out_dir / f"{MODEL}-{version}.efb"
    path.write_bytes(data)
    return E2EBundle(path, version, release_counter, model, len(data))
