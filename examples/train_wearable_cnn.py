"""Example: a 1D-CNN on a synthetic wearable task, small enough for a ring.

Windows of 3-axis accelerometer data (128 samples at 50 Hz, 2.56 s) in four classes that differ
the way real ones do: ``still`` (gravity and sensor noise), ``walk`` (about 2 Hz, moderate),
``run`` (about 3 Hz, strong, with vertical impacts) and ``restless`` (sleep-like stillness with
short random movement bursts). Generated with a seed. The network has about 13.5k parameters.

Writes ``model.pt2`` (a ``torch.export`` program with a dynamic batch), ``train.npz``,
``eval.npz`` and ``calibration.npz`` into ``--out``. Deterministic; well under a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import split_and_save

CLASSES = ["still", "walk", "run", "restless"]
RATE_HZ, LENGTH = 50.0, 128


def synthesise(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Accelerometer windows ``[N, 3, 128]`` in g, labels ``[N]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH) / RATE_HZ
    xs, ys = [], []
    for label in range(len(CLASSES)):
        for _ in range(n_per_class):
            gravity = rng.normal(0, 0.3, 3)
            gravity[2] += 1.0
            window = np.repeat(gravity[:, None], LENGTH, axis=1)
            phase = rng.uniform(0, 2 * np.pi, 3)
            if label == 1:
                f, amp = rng.uniform(1.6, 2.2), rng.uniform(0.25, 0.6)
                window += amp * np.sin(2 * np.pi * f * t + phase[:, None])
            elif label == 2:
                f, amp = rng.uniform(2.5, 3.3), rng.uniform(0.8, 1.6)
                window += amp * np.sin(2 * np.pi * f * t + phase[:, None])
                window[2] += 0.6 * amp * np.maximum(0, np.sin(2 * np.pi * f * t)) ** 4
            elif label == 3:
                for _ in range(rng.integers(1, 4)):
                    start = rng.integers(0, LENGTH - 16)
                    width = rng.integers(6, 16)
                    window[:, start : start + width] += rng.normal(0, 0.5, (3, width))
            window += rng.normal(0, rng.uniform(0.02, 0.12), window.shape)
            xs.append(window)
            ys.append(label)
    return np.asarray(xs, np.float32), np.asarray(ys, np.int64)


class WearableCNN(nn.Module):
    """Three conv blocks, global average pooling, a linear head: about 13.5k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(3, 16, 7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 64, 5, padding=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/wearable-cnn"))
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = synthesise(args.per_class, seed=0)
    train, held_out = split_and_save(x, y, args.out)
    model = WearableCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(train["X"]), torch.from_numpy(train["y"])
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(held_out["X"])).argmax(dim=1).numpy()
    accuracy = float((predicted == held_out["y"]).mean())
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (xt[:2],), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, args.out / "model.pt2")
    params = sum(p.numel() for p in model.parameters())
    print(f"wearable 1D-CNN: {params} parameters, held-out accuracy {accuracy:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
