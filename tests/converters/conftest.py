"""Trained examples, built once per session by running the example scripts as a user would."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from converters.pipeline import ConvertOptions, convert
from converters.reports import ConvertReport
from firmware_bundles import SigningKey, TrustedRoot, new_root, sign_root

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "digits-mlp": ("train_digits_mlp.py", "model.joblib"),
    "cancer-trees": ("train_breast_cancer_trees.py", "model.joblib"),
    "wearable-cnn": ("train_wearable_cnn.py", "model.pt2"),
}

#: The converter's ``created_at`` in these tests, so bundles reproduce byte for byte.
BUILD_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def convert_example(
    example: str,
    directory: Path,
    keys: list[SigningKey],
    out: Path,
    targets: list[str],
    **options: Any,
) -> ConvertReport:
    """Convert a trained example (its model and train, eval and calibration splits in
    ``directory``) as version 1.0.0 for ``targets``; ``options`` are further ConvertOptions."""
    settings = ConvertOptions(
        name=example,
        version="1.0.0",
        hardware_ids=targets,
        keys=keys,
        out_dir=out,
        created_at=BUILD_TIME,
        **options,
    )
    return convert(
        directory / EXAMPLES[example][1],
        directory / "train.npz",
        directory / "eval.npz",
        settings,
        directory / "calibration.npz",
    )


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("examples")
    dirs = {}
    for name, (script, _) in EXAMPLES.items():
        out = base / name
        subprocess.run(
            [sys.executable, str(REPO / "examples" / script), "--out", str(out)],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        dirs[name] = out
    return dirs


@pytest.fixture(scope="session")
def release_keys() -> list[SigningKey]:
    return [SigningKey.generate(), SigningKey.generate()]


@pytest.fixture(scope="session")
def trusted_root(release_keys: list[SigningKey]) -> TrustedRoot:
    root_key = SigningKey.generate()
    root = new_root(
        version=1,
        expires=datetime.now(UTC) + timedelta(days=30),
        role_keys={
            "root": [root_key.public],
            "release": [k.public for k in release_keys],
            "director": [root_key.public],
            "hil": [root_key.public],
        },
        thresholds={"release": 2},
    )
    return TrustedRoot.from_pinned(sign_root(root, [root_key]).to_bytes(), datetime.now(UTC))
