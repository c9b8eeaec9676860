"""Example: a random forest on the breast cancer data set (a model only phones and Pis can run).

Writes ``model.joblib``, ``train.npz``, ``eval.npz`` and ``calibration.npz`` into ``--out``.
Deterministic (fixed seeds); a few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import split_and_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/cancer-trees"))
    parser.add_argument("--trees", type=int, default=100)
    args = parser.parse_args()
    x, y = load_breast_cancer(return_X_y=True)
    train, held_out = split_and_save(x, y, args.out)
    model = RandomForestClassifier(n_estimators=args.trees, max_depth=8, random_state=0, n_jobs=1)
    model.fit(train["X"], train["y"])
    joblib.dump(model, args.out / "model.joblib")
    accuracy = model.score(held_out["X"], held_out["y"])
    print(f"random forest ({args.trees} trees, depth 8): held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
