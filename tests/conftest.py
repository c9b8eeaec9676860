"""Shared fixtures: keys, a trusted root and a sample bundle built through the public API."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from firmware_bundles import SigningKey, build, new_root, sign_root
from firmware_bundles.root import Root
from firmware_bundles.signing import Envelope

NOW = datetime(2026, 6, 1, tzinfo=UTC)
MODEL_BYTES = bytes(range(256)) * 40


def manifest_draft(files: dict[str, bytes] | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid manifest draft (every field but files) for a tiny float model."""
    model = (files or {"model.onnx": MODEL_BYTES}).get("model.onnx", MODEL_BYTES)
    draft: dict[str, Any] = {
        "name": "wrist-activity",
        "version": "1.2.3",
        "release_counter": 7,
        "created_at": "2026-01-01T00:00:00+00:00",
        "task": "classification",
        "targets": [
            {
                "target_id": "phone-android",
                "generation": "phone",
                "platform": "android",
                "firmware": {"minimum": "10.0.0"},
            },
        ],
        "runtime": {
            "model_file": "model.onnx",
            "format": "onnx",
            "opset": 17,
            "op_types": ["Add", "MatMul", "Softmax"],
            "min_onnxruntime": "1.17.0",
            "precision": "float32",
            "ram_estimate": {"bytes": 4096, "method": "test"},
        },
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, 2],
                "class_labels": ["rest", "move"],
            }
        ],
        "quantisation": {"scheme": "float32", "quantised_ops": 0},
        "metrics": {"accuracy": 0.95},
        "reference_histograms": {
            "inputs": [{"name": "x0", "kind": "numeric", "edges": [0.0, 1.0], "counts": [1, 2, 3]}],
            "outputs": [
                {
                    "name": "label",
                    "kind": "categorical",
                    "categories": ["rest", "move"],
                    "counts": [5, 5, 0],
                }
            ],
        },
        "self_test": {
            "tolerance": 1e-4,
            "vectors": [
                {
                    "inputs": {"input": [[0.0, 0.0, 0.0, 0.0]]},
                    "expected": {"probabilities": [[0.5, 0.5]]},
                }
            ],
        },
        "provenance": {"source_model_sha256": hashlib.sha256(model).hexdigest()},
    }
    draft.update(overrides)
    return draft


@dataclass
class Keys:
    root: list[SigningKey]
    release: list[SigningKey]
    director: list[SigningKey]
    hil: list[SigningKey]

    def make_root(
        self,
        *,
        version: int = 1,
        expires: datetime | None = None,
        thresholds: dict[str, int] | None = None,
        signers: list[SigningKey] | None = None,
    ) -> tuple[Root, Envelope]:
        root = new_root(
            version=version,
            expires=expires or NOW + timedelta(days=365),
            role_keys={
                r: [k.public for k in getattr(self, r)]
                for r in ("root", "release", "director", "hil")
            },
            thresholds=thresholds or {"root": 1, "release": 2, "director": 1, "hil": 1},
        )
        return root, sign_root(root, self.root if signers is None else signers)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        root=[SigningKey.generate(), SigningKey.generate()],
        release=[SigningKey.generate(), SigningKey.generate()],
        director=[SigningKey.generate()],
        hil=[SigningKey.generate()],
    )


@pytest.fixture(scope="session")
def root(keys: Keys) -> Root:
    return keys.make_root()[0]


@pytest.fixture(scope="session")
def bundle_bytes(keys: Keys) -> bytes:
    return build(manifest_draft(), {"model.onnx": MODEL_BYTES}, keys.release)
