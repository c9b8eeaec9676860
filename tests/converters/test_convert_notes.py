"""The convert table says in our words why a variant was skipped, whole, not cut off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from firmware_bundles import SigningKey
from tests.converters.conftest import REPO


def test_skipped_static_variants_of_a_tree_model_say_why_in_our_words(
    examples: dict[str, Path], tmp_path: Path
) -> None:
    """Tree ensembles have nothing ONNX Runtime can calibrate; the table says so, not ORT."""
    directory = examples["cancer-trees"]
    key = tmp_path / "release.pem"
    key.write_bytes(SigningKey.generate().to_pem())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "convert",
            str(directory / "model.joblib"),
            "--name",
            "cancer-trees",
            "--version",
            "1.0.0",
            "--targets",
            "phone-android",
            "--train",
            str(directory / "train.npz"),
            "--eval",
            str(directory / "eval.npz"),
            "--key",
            str(key),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", "SOURCE_DATE_EPOCH": "0"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "Histogram has not been collected" not in table
    assert "Please run col" not in table
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 2}
    for name in ("int8-static-per-channel-entropy", "int8-static-per-channel-percentile"):
        row = rows[name]
        assert "skipped: nothing to calibrate" in row, row
        assert "tree ensembles" in row, row
    # ONNX Runtime's own words stay available, whole, in the build report.
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    entropy = next(v for v in report["variants"] if v["name"].endswith("entropy"))
    assert entropy["error"].startswith("nothing to calibrate")
    assert "Histogram has not been collected" in entropy["detail"]
