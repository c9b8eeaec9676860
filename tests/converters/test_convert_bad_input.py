"""Every bad input to `edgefleet convert` stops with a clear error naming the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from firmware_bundles import SigningKey
from tests.cases import named_cases

runner = CliRunner()


@pytest.fixture(scope="module")
def bad_files(examples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.joblib").write_text("this is not a model\n")
    (d / "broken.onnx").write_bytes(b"\x00\x01garbage")
    held_out = np.load(examples["digits-mlp"] / "eval.npz")
    np.savez(d / "narrow.npz", X=held_out["X"][:, :10], y=held_out["y"])
    np.savez(d / "labels.npz", X=held_out["X"], y=held_out["y"] + 100)
    np.savez(d / "nox.npz", features=held_out["X"])
    (d / "key.pem").write_bytes(SigningKey.generate().to_pem())
    return d


def convert_args(examples: dict[str, Path], bad: Path, **changes: str) -> list[str]:
    digits = examples["digits-mlp"]
    args = {
        "model": str(digits / "model.joblib"),
        "--name": "digits",
        "--version": "1.0.0",
        "--hardware-ids": "phone-android",
        "--train": str(digits / "train.npz"),
        "--eval": str(digits / "eval.npz"),
        "--key": str(bad / "key.pem"),
        "--out": str(bad / "out"),
    }
    args.update(changes)
    flat = ["convert", args.pop("model")]
    for k, v in args.items():
        flat += [k, v]
    return flat


CASES = [
    ("not-a-model", {"model": "{bad}/notes.joblib"}, "is not a model we can read"),
    ("corrupt-onnx", {"model": "{bad}/broken.onnx"}, "not a valid ONNX model"),
    ("missing-model", {"model": "{bad}/nope.joblib"}, "does not exist"),
    ("feature-count", {"--eval": "{bad}/narrow.npz"}, "rows have shape (10,)"),
    (
        "feature-count-train",
        {"--train": "{bad}/narrow.npz"},
        "has 10 features per row, the model expects 64",
    ),
    ("label-set", {"--eval": "{bad}/labels.npz"}, "has labels [100, 101"),
    ("npz-without-x", {"--eval": "{bad}/nox.npz"}, "must hold arrays 'X' and 'y'"),
    ("unknown-target", {"--hardware-ids": "ring-gen9"}, "unknown target 'ring-gen9'; known:"),
    ("not-semver", {"--version": "1.0"}, "'1.0' is not a semantic version"),
    ("missing-key", {"--key": "{bad}/absent.pem"}, "key file"),
    ("budget", {"--accuracy-budget": "1.5"}, "must be in [0, 1)"),
]


@named_cases(("changes", "message"), CASES)
def test_bad_input_is_named(
    examples: dict[str, Path], bad_files: Path, changes: dict[str, str], message: str
) -> None:
    resolved = {k: v.format(bad=bad_files) for k, v in changes.items()}
    result = runner.invoke(app, convert_args(examples, bad_files, **resolved))
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
