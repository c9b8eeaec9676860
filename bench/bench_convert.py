"""Converter results per example and target: size, accuracy and latency against the float model.

Trains the three examples, converts each for ring-gen3, phone-android and devboard-rpi4, and prints
float size, chosen variant and size, ratio, float and chosen accuracy, and single-sample and batch
latency in ONNX Runtime (one thread), with the float model measured in the same run as baseline.

    python bench/bench_convert.py [--out build/bench]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converters.pipeline import ConvertOptions, convert  # noqa: E402
from firmware_bundles import SigningKey  # noqa: E402

EXAMPLES = {
    "digits-mlp": ("train_digits_mlp.py", "model.joblib"),
    "cancer-trees": ("train_breast_cancer_trees.py", "model.joblib"),
    "wearable-cnn": ("train_wearable_cnn.py", "model.pt2"),
}
TARGETS = ["ring-gen3", "phone-android", "devboard-rpi4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    key = SigningKey.generate()
    table = Table(title="edgefleet convert: chosen variant per target vs float32 (same run)")
    for col in (
        "example",
        "target",
        "float B",
        "chosen",
        "chosen B",
        "ratio",
        "float acc",
        "chosen acc",
        "1-sample ms float/chosen",
        "batch-256 ms float/chosen",
    ):
        table.add_column(col, justify="left" if col in ("example", "target", "chosen") else "right")
    for name, (script, model_file) in EXAMPLES.items():
        data = args.out / name
        subprocess.run(
            [sys.executable, str(REPO / "examples" / script), "--out", str(data)],
            check=True,
            capture_output=True,
        )
        report = convert(
            data / model_file,
            data / "train.npz",
            data / "eval.npz",
            ConvertOptions(
                name=name,
                version="1.0.0",
                targets=TARGETS,
                keys=[key],
                out_dir=data / "bundles",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            data / "calibration.npz",
        )
        variants = {v.name: v for v in report.variants}
        base = variants["float32"]
        for target in report.targets:
            if not target.ok:
                table.add_row(
                    name,
                    target.target_id,
                    str(report.float_bytes),
                    "[red]none[/]",
                    "-",
                    "-",
                    f"{report.float_metric:.4f}",
                    "-",
                    "-",
                    (target.reason or "")[:40],
                )
                continue
            chosen = variants[target.variant or ""]
            table.add_row(
                name,
                target.target_id,
                str(report.float_bytes),
                chosen.name,
                str(chosen.model_bytes),
                f"{chosen.model_bytes / report.float_bytes:.3f}",
                f"{report.float_metric:.4f}",
                f"{target.metric:.4f}",
                f"{base.single_ms:.3f}/{chosen.single_ms:.3f}",
                f"{base.batch_ms:.2f}/{chosen.batch_ms:.2f}",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
