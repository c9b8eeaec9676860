"""Verifying a bundle from disk against reading and hashing its bytes once, in one run.

Baseline: ``hashlib.sha256(path.read_bytes())``. Measured: ``firmware_bundles.verify`` of the
same file read from disk (archive checks, release-signature threshold, every file's SHA-256).

    python bench/bench_verify.py [--mb 50] [--repeat 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from firmware_bundles import SigningKey, build, new_root, verify
from tests.conftest import manifest_draft


def timed(fn: object, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="Model file size in MB.")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    release = [SigningKey.generate(), SigningKey.generate()]
    root = new_root(
        version=1,
        expires=datetime.now(UTC) + timedelta(days=1),
        role_keys={
            "root": [release[0].public],
            "release": [k.public for k in release],
            "director": [release[0].public],
            "hil": [release[0].public],
        },
        thresholds={"release": 2},
    )
    model = os.urandom(args.mb * 1_000_000)
    draft = manifest_draft({"model.onnx": model})
    data = build(draft, {"model.onnx": model}, release)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.efb"
        path.write_bytes(data)
        size = len(data)
        del data, model

        def baseline() -> None:
            hashlib.sha256(path.read_bytes()).hexdigest()

        def verify_from_disk() -> None:
            verify(path.read_bytes(), root)

        baseline()
        verify_from_disk()  # warm the page cache for both
        base, ver = [], []
        for _ in range(args.repeat):  # interleave so drift hits both alike
            base += timed(baseline, 1)
            ver += timed(verify_from_disk, 1)
    b, v = statistics.median(base), statistics.median(ver)
    table = Table(title=f"Verify a {args.mb} MB bundle from disk (median of {args.repeat})")
    for col in ("what", "median ms", "GB/s", "ratio"):
        table.add_column(col, justify="right" if col != "what" else "left")
    table.add_row(
        "read + sha256 once (baseline)", f"{b * 1e3:.1f}", f"{size / b / 1e9:.2f}", "1.00"
    )
    table.add_row("edgefleet verify", f"{v * 1e3:.1f}", f"{size / v / 1e9:.2f}", f"{v / b:.2f}")
    Console().print(table)
    print(f"ratio verify/baseline: {v / b:.3f} (target <= 1.30)")


if __name__ == "__main__":
    main()
