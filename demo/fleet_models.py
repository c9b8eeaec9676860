"""The live fleet's model versions: the digits example, three times through `edgefleet convert`.

* 1.0.0: the example's StandardScaler + MLP(64) pipeline (``examples/train_digits_mlp.py``).
* 2.0.0: the same pipeline trained longer: as accurate, outputs barely move; its gates pass.
* 3.0.0: the regression the demo injects: a far bigger network (slower on every input) trained
  on labels a data bug swapped for two digits (8s labelled 9 and 9s labelled 8), so it is wrong
  on those inputs and right on the others. Nothing in the bundle says so: the converter's
  held-out check uses the same swapped labels, as a broken labelling pipeline would; only the
  field, where users label what they meant, shows it.

Every bundle goes to the phones and the Raspberry Pi boards of the fleet; the converter signs it
with the demo's release key and the server adds its own release signature on publish.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MODEL = "digits-fleet"
HARDWARE_IDS = ("phone-android", "devboard-rpi4")
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
#: The digits the v3 data bug mislabels, and what it labels them (every class still appears).
CORRUPTED_LABELS = {8: 9, 9: 8}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_data_args(data: Path) -> list[str]:
    """`edgefleet convert`'s data options for an example's output folder (its train, eval and
    calibration sets)."""
    return [
        "--train",
        str(data / "train.npz"),
        "--eval",
        str(data / "eval.npz"),
        "--calibration",
        str(data / "calibration.npz"),
    ]


def train_v3(out: Path) -> None:
    """Train v3 into ``out`` (``model.joblib`` and the example's data files, labels corrupted)."""
    import joblib
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    sys.path.insert(0, str(EXAMPLES))
    from _common import split_and_save

    x, y = load_digits(return_X_y=True)
    y = np.array([CORRUPTED_LABELS.get(int(v), int(v)) for v in y])
    train, held_out = split_and_save(x, y, out)
    mlp = MLPClassifier(hidden_layer_sizes=(512, 512), max_iter=10, random_state=0)
    model = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    model.fit(train["X"], train["y"])
    joblib.dump(model, out / "model.joblib")
    print(
        f"digits MLP (512, 512) on corrupted labels: held-out accuracy against the same"
        f" labels {model.score(held_out['X'], held_out['y']):.4f} -> {out}"
    )


def build_versions(
    edgefleet: Callable[..., subprocess.CompletedProcess[str]], keys: list[Path], out: Path
) -> dict[str, list[Path]]:
    """Train and convert each version; per version its bundles (one per hardware id)."""
    trainings: dict[str, list[str]] = {
        "1.0.0": [str(EXAMPLES / "train_digits_mlp.py"), "--max-iter", "80"],
        "2.0.0": [str(EXAMPLES / "train_digits_mlp.py"), "--max-iter", "300"],
        "3.0.0": [str(Path(__file__).resolve()), "--train-v3"],
    }
    bundles: dict[str, list[Path]] = {}
    for counter, version in enumerate(VERSIONS, start=1):
        data = out / "examples" / f"digits-{version}"
        proc = subprocess.run(
            [sys.executable, *trainings[version], "--out", str(data)],
            capture_output=True,
            text=True,
            check=False,
        )
        print(proc.stdout.strip())
        if proc.returncode != 0:
            raise SystemExit(f"demo failed: training {version}: {proc.stderr[-2000:]}")
        signers = [arg for key in keys for arg in ("--key", str(key))]
        edgefleet(
            "convert",
            str(data / "model.joblib"),
            "--name",
            MODEL,
            "--version",
            version,
            "--release-counter",
            str(counter),
            "--hardware-ids",
            ",".join(HARDWARE_IDS),
            *example_data_args(data),
            *signers,
            "--out",
            str(out / "bundles" / version),
            quiet=True,
        )
        bundles[version] = [
            out / "bundles" / version / f"{MODEL}-{version}-{h}.efb" for h in HARDWARE_IDS
        ]
    return bundles


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train v3 (called by build_versions).")
    parser.add_argument("--train-v3", action="store_true", required=True)
    parser.add_argument("--out", type=Path, required=True)
    train_v3(parser.parse_args().out)
