"""Converter results per example and target: size, accuracy and latency against the float model.

Trains the three examples, converts each for ring-gen3, ring-gen4, phone-android and
devboard-rpi4, and prints float size, chosen variant and size, ratio, float and chosen accuracy,
and single-sample and batch latency (ONNX Runtime, one thread; TFLM one sample per invoke for a
ring's .tflite), with the float model measured in the same run as baseline. Then bundle bytes per
example and target against the figures measured before manifest format 2 (kept below), what every
byte of each ring bundle beyond its model is, and the .tflite rows of the micro targets.

    python bench/bench_convert.py [--out build/bench]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converters.pipeline import ConvertOptions, convert  # noqa: E402
from converters.reports import ConvertReport  # noqa: E402
from firmware_bundles import SigningKey  # noqa: E402

EXAMPLES = {
    "digits-mlp": ("train_digits_mlp.py", "model.joblib"),
    "cancer-trees": ("train_breast_cancer_trees.py", "model.joblib"),
    "wearable-cnn": ("train_wearable_cnn.py", "model.pt2"),
}
TARGETS = ["ring-gen3", "ring-gen4", "phone-android", "devboard-rpi4"]
#: Measured with this bench's convert settings on c3c9fbb (manifest format 1: self-test vectors
#: as JSON in the manifest, archives padded to tar's 10 KiB records): (example, target) ->
#: (bundle bytes, model bytes, manifest bytes, of which self-test JSON, of which histograms JSON).
#: cancer-trees fits no ring (its forest is 111 KB) then and now.
BEFORE = {
    ("digits-mlp", "ring-gen3"): (30720, 6782, 12876, 1163, 9447),
    ("digits-mlp", "phone-android"): (30720, 6311, 13021, 1420, 9447),
    ("digits-mlp", "devboard-rpi4"): (30720, 6311, 13020, 1420, 9447),
    ("cancer-trees", "phone-android"): (133120, 111043, 12648, 878, 9695),
    ("cancer-trees", "devboard-rpi4"): (133120, 111043, 12647, 878, 9695),
    ("wearable-cnn", "ring-gen3"): (40960, 18806, 16421, 12970, 1197),
    ("wearable-cnn", "phone-android"): (40960, 18806, 16418, 12970, 1197),
    ("wearable-cnn", "devboard-rpi4"): (40960, 18806, 16417, 12970, 1197),
}
#: Target for a ring bundle: bundle bytes minus model bytes.
RING_OVERHEAD_MAX = 8 * 1024


def _json_bytes(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def breakdown(bundle: bytes, model_file: str) -> dict[str, int]:
    """Every byte of a bundle by what it is (the model, manifest parts, other files, tar)."""
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = tar.getmembers()
        manifest_member = tar.extractfile("manifest.json")
        assert manifest_member is not None
        envelope = json.loads(manifest_member.read())
    signed = envelope["signed"]
    sizes = {m.name: m.size for m in members}
    parts = {
        "model": sizes.pop(model_file),
        "manifest: reference histograms": _json_bytes(signed["reference_histograms"]),
        "manifest: self-test layout": _json_bytes(signed["self_test"]),
        "manifest: provenance": _json_bytes(signed["provenance"]),
        "manifest: runtime, tensors, targets": sum(
            _json_bytes(signed[k]) for k in ("runtime", "inputs", "outputs", "targets")
        ),
    }
    manifest_bytes = sizes.pop("manifest.json")
    parts["manifest: signatures"] = manifest_bytes - _json_bytes(signed)
    parts["manifest: the rest"] = manifest_bytes - sum(
        v for k, v in parts.items() if k.startswith("manifest")
    )
    for name, size in sorted(sizes.items()):
        parts[f"file {name}"] = size
    data_end = max(m.offset_data + m.size for m in members)
    parts["tar: headers"] = 512 * len(members)
    parts["tar: padding to 512-byte blocks"] = sum(-m.size % 512 for m in members)
    parts["tar: end of archive"] = len(bundle) - data_end - (-data_end % 512)
    assert sum(parts.values()) == len(bundle), (parts, len(bundle))
    return parts


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _names(bundle: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        return tar.getnames()


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
    sizes: dict[tuple[str, str], tuple[dict[str, int], int]] = {}
    reports: dict[str, ConvertReport] = {}
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
                hardware_ids=TARGETS,
                keys=[key],
                out_dir=data / "bundles",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            data / "calibration.npz",
        )
        reports[name] = report
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
            bundle = Path(target.bundle or "").read_bytes()
            model_name = next(n for n in _names(bundle) if n.startswith("model."))
            sizes[(name, target.target_id)] = (breakdown(bundle, model_name), len(bundle))
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
                # TFLM runs one sample per invoke: a .tflite has no batch figure.
                f"{base.batch_ms:.2f}/{_ms(chosen.batch_ms)}",
            )
    console = Console(width=200)
    console.print(table)
    console.print(_sizes_table(sizes))
    console.print(tflite_table(reports))
    for (name, target_id), (parts, _) in sizes.items():
        if target_id.startswith("ring"):
            console.print(_breakdown_table(name, target_id, parts))


def _sizes_table(sizes: dict[tuple[str, str], tuple[dict[str, int], int]]) -> Table:
    table = Table(title="bundle bytes before (format 1, c3c9fbb) and after (format 2), same run")
    for col in (
        "example",
        "target",
        "model B before/after",
        "bundle B before",
        "bundle B after",
        "overhead B before",
        "overhead B after",
        "manifest B before/after",
        "self-test B before (JSON)/after (file + layout)",
    ):
        table.add_column(col, justify="left" if col in ("example", "target") else "right")
    for (name, target_id), (parts, total) in sizes.items():
        before = BEFORE.get((name, target_id))
        manifest = sum(v for k, v in parts.items() if k.startswith("manifest"))
        test_after = parts.get("file self_test.bin", 0) + parts["manifest: self-test layout"]
        overhead = total - parts["model"]
        flag = ""
        if target_id.startswith("ring"):
            flag = " ok" if overhead <= RING_OVERHEAD_MAX else f" over {RING_OVERHEAD_MAX}"
        if before is None:
            table.add_row(
                name,
                target_id,
                f"-/{parts['model']}",
                "-",
                str(total),
                "-",
                f"{overhead}{flag}",
                f"-/{manifest}",
                f"-/{test_after}",
            )
            continue
        b_total, b_model, b_manifest, b_test, _ = before
        table.add_row(
            name,
            target_id,
            f"{b_model}/{parts['model']}",
            str(b_total),
            str(total),
            str(b_total - b_model),
            f"{overhead}{flag}",
            f"{b_manifest}/{manifest}",
            f"{b_test}/{test_after}",
        )
    return table


def _breakdown_table(name: str, target_id: str, parts: dict[str, int]) -> Table:
    table = Table(title=f"{name} on {target_id}: every byte beyond the model")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    for what, size in parts.items():
        if what != "model":
            table.add_row(what, str(size))
    table.add_row("total beyond the model", str(sum(parts.values()) - parts["model"]))
    return table


#: TFLite rows: (example, micro target) pairs of the same run.
TFLITE_ROWS = [
    ("digits-mlp", "ring-gen3"),
    ("wearable-cnn", "ring-gen3"),
    ("cancer-trees", "ring-gen4"),
]


def tflite_table(reports: dict[str, ConvertReport]) -> Table:
    """Chosen .tflite per micro target: size vs float .tflite, TFLM accuracy, measured arena."""
    table = Table(title="edgefleet convert: .tflite for micro targets, scored in TFLM (same run)")
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
        table.add_column(col, justify="left" if col in ("example", "target", "chosen") else "right")
    for name, target_id in TFLITE_ROWS:
        report = reports[name]
        variants = {v.name: v for v in report.variants}
        target = next(t for t in report.targets if t.target_id == target_id)
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
