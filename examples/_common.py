"""Shared helpers for the example training scripts: splits and saving data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def split_and_save(
    x: np.ndarray, y: np.ndarray, out: Path, seed: int = 0
) -> tuple[np.lib.npyio.NpzFile, np.lib.npyio.NpzFile]:
    """Shuffle with ``seed``; 70% train, 30% eval; calibration = the first 256 training rows.

    Writes ``train.npz``, ``eval.npz`` and ``calibration.npz`` into ``out``; returns the train
    and eval files as written (``X`` and ``y``), so a script trains on exactly what it saved.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    cut = int(len(x) * 0.7)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (xs, ys) in {
        "train": (x[:cut], y[:cut]),
        "eval": (x[cut:], y[cut:]),
        "calibration": (x[:256], y[:256]),
    }.items():
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], X=xs, y=ys)
    return np.load(paths["train"]), np.load(paths["eval"])
