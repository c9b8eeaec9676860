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
    Console(width=200).print(tflite_table(args.out, key))


#: TFLite rows: (example, target) pairs and the old ONNX int8 estimate they replace.
TFLITE_ROWS = [
    ("digits-mlp", "ring-gen3"),
    ("wearable-cnn", "ring-gen3"),
    ("cancer-trees", "ring-gen4"),
]


def tflite_table(out: Path, key: SigningKey) -> Table:
    """Chosen .tflite per micro target: size vs float .tflite, TFLM accuracy, measured arena."""
    table = Table(title="edgefleet convert: .tflite for micro targets, scored in TFLM")
    for col in (
        "example",
        "target",
        "chosen",
        "float .tflite B",
        "chosen B",
        "ratio (<= 0.42)",
        "float acc",
        "TFLM acc",
        "points lost (<= 1)",
        "TFLM arena B",
        "old ONNX estimate B",
    ):
        table.add_column(col)
    for name, target_id in TFLITE_ROWS:
        data = out / name
        report = convert(
            data / EXAMPLES[name][1],
            data / "train.npz",
            data / "eval.npz",
            ConvertOptions(
                name=name,
                version="1.0.0",
                targets=[target_id],
                keys=[key],
                out_dir=data / "bundles-tflite",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            data / "calibration.npz",
        )
        variants = {v.name: v for v in report.variants}
        target = report.targets[0]
        chosen = variants.get(target.variant or "")
        flt = variants["tflite-float32"]
        onnx_int8 = variants.get("int8-static-per-channel-minmax")
        if chosen is None or target.metric is None:
            table.add_row(name, target_id, "[red]none[/]", *["-"] * 7, (target.reason or "")[:60])
            continue
        table.add_row(
            name,
            target_id,
            chosen.name,
            str(flt.model_bytes),
            str(chosen.model_bytes),
            f"{chosen.model_bytes / flt.model_bytes:.3f}",
            f"{report.float_metric:.4f}",
            f"{target.metric:.4f}",
            f"{(report.float_metric - target.metric) * 100:.2f}",
            str(chosen.ram_bytes),
            str(onnx_int8.ram_bytes) if onnx_int8 and onnx_int8.ram_bytes else "-",
        )
    return table


if __name__ == "__main__":
    main()
