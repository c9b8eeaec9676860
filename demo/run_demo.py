"""EdgeFleet demo: build, sign, inspect and verify a model bundle end to end through the CLI.

Trains a small digit classifier, writes it as an ONNX graph made only of ops a micro runtime has
(MatMul, Add, Softmax), packs it into a signed bundle for a ring and a phone, verifies it against
a trusted root, then shows what verification says about a tampered copy and a rotated root. Then
converts three example models, and runs the fleet slice (demo/fleet_demo.py): a server, a phone's
agent that installs the wearable model, inference with the server gone, and the telemetry
arriving once it is back.

    python demo/run_demo.py [--out build/demo] [--short]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
CREATED_AT = "2026-01-01T00:00:00+00:00"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def edgefleet(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, echoing the command and its output."""
    cmd = [sys.executable, "-m", "edgefleet", *args]
    print("$ edgefleet " + " ".join(args), flush=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "160")}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo failed: edgefleet {' '.join(args)} exited {proc.returncode}")
    return proc


def pack(out: str, *keys: str) -> None:
    """`edgefleet bundle pack` of the demo's draft and model, signed with ``keys``."""
    signers = [arg for key in keys for arg in ("--key", key)]
    draft = ["--manifest", "manifest.draft.json", "--file", "model.onnx"]
    edgefleet("bundle", "pack", *draft, *signers, "--out", out)


def train(short: bool) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """A logistic regression on 8x8 digits, written as MatMul + Add + Softmax ONNX."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_ev, y_tr, y_ev = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    clf = LogisticRegression(max_iter=100 if short else 1000, random_state=0)
    clf.fit(x_tr, y_tr)
    w = numpy_helper.from_array(clf.coef_.T.astype(np.float32), "W")
    b = numpy_helper.from_array(clf.intercept_.astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits_linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "edgefleet-demo"
    onnx.checker.check_model(model)
    data = model.SerializeToString(deterministic=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"input": x_ev})[0]
    accuracy = float((probs.argmax(axis=1) == y_ev).mean())
    return data, x_tr, y_tr, x_ev, probs, accuracy


def histogram(name: str, values: np.ndarray, bins: int = 8) -> dict[str, object]:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])).tolist()
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"name": name, "kind": "numeric", "edges": edges, "counts": counts.tolist()}


def draft(
    model: bytes,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_ev: np.ndarray,
    probs: np.ndarray,
    accuracy: float,
) -> dict[str, object]:
    import hashlib

    features = [f"pixel_{i}" for i in range(64)]
    return {
        "name": "digits-linear",
        "version": "1.0.0",
        "release_counter": 1,
        "created_at": CREATED_AT,
        "task": "classification",
        "targets": [
            {
                "target_id": "phone-android",
                "generation": "phone",
                "platform": "android",
                "firmware": {"minimum": "10.0.0"},
            },
            {
                "target_id": "devboard-rpi4",
                "generation": "devboard",
                "platform": "rpi4",
                "firmware": {"minimum": "1.0.0"},
            },
        ],
        "runtime": {
            "model_file": "model.onnx",
            "format": "onnx",
            "opset": 17,
            "op_types": ["Add", "MatMul", "Softmax"],
            "min_onnxruntime": "1.17.0",
            "precision": "float32",
            "ram_estimate": {
                "bytes": 64 * 10 * 4 + 10 * 4 + 3 * 10 * 4 + 64 * 4,
                "method": "initializers + live activations at batch 1 (by hand)",
            },
        },
        "inputs": [
            {"name": "input", "dtype": "float32", "shape": [None, 64], "feature_names": features}
        ],
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, 10],
                "class_labels": list(range(10)),
            }
        ],
        "quantisation": {
            "scheme": "float32",
            "quantised_ops": 0,
            "notes": "demo bundle; the converter (issue 3) picks variants",
        },
        "metrics": {"accuracy": round(accuracy, 6), "model_bytes": len(model)},
        "reference_histograms": {
            "inputs": [histogram(f, x_tr[:, i]) for i, f in enumerate(features)],
            "outputs": [
                {
                    "name": "label",
                    "kind": "categorical",
                    "categories": list(range(10)),
                    "counts": [*np.bincount(y_tr, minlength=10).tolist(), 0],
                }
            ],
        },
        "self_test": {
            "tolerance": 1e-4,
            "vectors": [
                {
                    "inputs": {"input": [x_ev[i].tolist()]},
                    "expected": {"probabilities": [probs[i].tolist()]},
                }
                for i in range(3)
            ],
        },
        "provenance": {
            "source_model_sha256": hashlib.sha256(model).hexdigest(),
            "tool_versions": {"onnx": onnx.__version__},
            "builder": "demo/run_demo.py",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "demo")
    parser.add_argument("--short", action="store_true", help="Fewer training iterations (tests).")
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "keys").mkdir(parents=True)
    os.chdir(out)

    step("1. Keys: two release keys (offline), a director key (server), root and HIL keys")
    for name in ("root", "release1", "release2", "director", "hil"):
        edgefleet("keys", "generate", "--out", f"keys/{name}.pem")

    step("2. Trusted root v1: a bundle needs both release signatures (threshold 2)")
    edgefleet(
        "root",
        "init",
        "--out",
        "root.json",
        "--root-key",
        "keys/root.pem",
        "--release-key",
        "keys/release1.pem.pub",
        "--release-key",
        "keys/release2.pem.pub",
        "--director-key",
        "keys/director.pem.pub",
        "--hil-key",
        "keys/hil.pem.pub",
        "--threshold",
        "release=2",
    )

    step("3. A model: logistic regression on 8x8 digits as MatMul+Add+Softmax ONNX")
    model, x_tr, y_tr, x_ev, probs, accuracy = train(args.short)
    Path("model.onnx").write_bytes(model)
    Path("manifest.draft.json").write_text(
        json.dumps(draft(model, x_tr, y_tr, x_ev, probs, accuracy))
    )
    print(f"model.onnx: {len(model)} bytes, held-out accuracy {accuracy:.3f}")

    step("4. Pack with one release key, add the second; each signature makes a new bundle")
    pack("digits-1sig.efb", "keys/release1.pem")
    edgefleet("bundle", "verify", "digits-1sig.efb", "--root", "root.json", check=False)
    edgefleet(
        "bundle", "sign", "digits-1sig.efb", "--key", "keys/release2.pem", "--out", "digits.efb"
    )

    step("5. Inspect and verify, for the phone it will go to")
    edgefleet("bundle", "inspect", "digits.efb")
    edgefleet(
        "bundle", "verify", "digits.efb", "--root", "root.json", "--hardware-id", "phone-android"
    )

    step("6. Pack again: byte-identical (deterministic archive, no clock read)")
    pack("again.efb", "keys/release1.pem", "keys/release2.pem")
    same = Path("again.efb").read_bytes() == Path("digits.efb").read_bytes()
    print(f"identical to digits.efb: {same}")
    if not same:
        raise SystemExit("demo failed: packing is not deterministic")

    step("7. Attacks: a flipped model byte, a bundle for the wrong target")
    data = bytearray(Path("digits.efb").read_bytes())
    data[data.rfind(b"probabilities") + 2] ^= 0x01
    Path("tampered.efb").write_bytes(bytes(data))
    bad = edgefleet("bundle", "verify", "tampered.efb", "--root", "root.json", check=False)
    wrong = edgefleet(
        "bundle",
        "verify",
        "digits.efb",
        "--root",
        "root.json",
        "--hardware-id",
        "ring-gen4",
        check=False,
    )
    if bad.returncode == 0 or wrong.returncode == 0:
        raise SystemExit("demo failed: a bad bundle verified")

    step("8. Root rotation: v2 replaces the director key, signed by the root key")
    edgefleet("keys", "generate", "--out", "keys/director2.pem")
    edgefleet(
        "root",
        "rotate",
        "root.json",
        "--out",
        "2.root.json",
        "--director-key",
        "keys/director2.pem.pub",
        "--sign-key",
        "keys/root.pem",
    )
    edgefleet("root", "verify", "--trusted", "root.json", "2.root.json")

    step("9. The converter: train the three examples, convert each for a ring, a phone and a Pi")
    examples = ROOT / "examples"
    quick = (
        {
            "digits": ["--max-iter", "60"],
            "trees": ["--trees", "30"],
            "wearable": ["--epochs", "3", "--per-class", "250"],
        }
        if args.short
        else {}
    )
    runs = [
        ("digits", "train_digits_mlp.py", "model.joblib"),
        ("trees", "train_breast_cancer_trees.py", "model.joblib"),
        ("wearable", "train_wearable_cnn.py", "model.pt2"),
    ]
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")
    from fleet_models import example_data_args  # beside this script

    for name, script, model_file in runs:
        data = Path("examples") / name
        proc = subprocess.run(
            [sys.executable, str(examples / script), "--out", str(data), *quick.get(name, [])],
            capture_output=True,
            text=True,
            check=True,
        )
        print(proc.stdout.strip())
        result = edgefleet(
            "convert",
            str(data / model_file),
            "--name",
            f"{name}-demo",
            "--version",
            "1.0.0",
            "--hardware-ids",
            "ring-gen3,phone-android,devboard-rpi4",
            *example_data_args(data),
            "--key",
            "keys/release1.pem",
            "--key",
            "keys/release2.pem",
            "--out",
            f"bundles/{name}",
            check=False,
        )
        if result.returncode != 0 and name != "trees":
            raise SystemExit(f"demo failed: converting {name} exited {result.returncode}")
    if not Path("bundles/trees/trees-demo-1.0.0-phone-android.efb").exists():
        raise SystemExit("demo failed: the tree ensemble should still build for the phone")
    print(
        "(the tree ensemble, lowered to tensor ops, needs more RAM than ring-gen3 has;"
        " it builds for the phone and the Pi)"
    )
    edgefleet(
        "bundle",
        "verify",
        "bundles/wearable/wearable-demo-1.0.0-ring-gen3.efb",
        "--root",
        "root.json",
        "--hardware-id",
        "ring-gen3",
    )

    from fleet_demo import run_fleet  # beside this script

    run_fleet(
        edgefleet,
        step,
        bundle=Path("bundles/wearable/wearable-demo-1.0.0-phone-android.efb"),
        eval_data=Path("examples/wearable/eval.npz"),
        short=args.short,
    )

    step("Done")
    print(f"built and verified {out / 'digits.efb'}")
    print(f"server and agent logs: {out / 'server.log'}, {out / 'agent.log'}")


if __name__ == "__main__":
    main()
