"""Example: a scikit-learn Pipeline (StandardScaler + MLP) on the 8x8 digits data set.

Writes ``model.joblib``, ``train.npz``, ``eval.npz`` and ``calibration.npz`` into ``--out``.
Deterministic (fixed seeds); a few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import split_and_save

HIDDEN = (64,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/digits-mlp"))
    parser.add_argument("--max-iter", type=int, default=300)
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    train, held_out = split_and_save(x, y, args.out)
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "mlp",
                MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=args.max_iter, random_state=0),
            ),
        ]
    )
    model.fit(train["X"], train["y"])
    joblib.dump(model, args.out / "model.joblib")
    params = sum(w.size for w in model[-1].coefs_) + sum(b.size for b in model[-1].intercepts_)
    accuracy = model.score(held_out["X"], held_out["y"])
    print(
        f"digits MLP {HIDDEN}: {params} parameters, held-out accuracy {accuracy:.4f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
