"""The telemetry fold job alone (``server.fold.fold``), on windows written straight into the
database, for both batch shapes and both databases; optionally under cProfile.

What ingest stores is written directly (``telemetry_batch`` and ``telemetry_window`` rows for
``--devices`` devices, ``--windows`` windows in 10-window batches of the one model version
bench/telemetry.lua reports; each window the aggregate that script's window becomes), then folded
back to back at ``--limit`` windows a transaction until nothing waits, and timed. The windows are
folded twice over: ``--rounds`` rounds of appending and folding, so later rounds add into rollups
that exist (as a running server's folds mostly do).

Batch shapes (bench/telemetry.lua, ``EDGEFLEET_BENCH_SHAPE``):

- ``hourly``: a batch is 10 consecutive hourly windows (one or two days), as a device uploads;
- ``scattered``: the shape telemetry.lua had first, each batch's windows over 7 days, one per day
  (so nearly every window has a day rollup of its own).

With ``--baseline DIR`` (another checkout of the project, say ``git archive main | tar -x -C
DIR``), each case is run in a subprocess with that tree's ``server`` package and then with this
one's, back to back, and the table gives the ratio: the machine is shared, so only figures from
the same run compare.

    python bench/bench_fold.py [--databases sqlite,postgresql] [--shapes hourly,scattered]
        [--devices 10000] [--windows 100000] [--rounds 2] [--limit 5000] [--folders 1]
        [--profile FILE] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

REPO = Path(__file__).resolve().parent.parent
# The code measured: this tree, or the baseline's (a subprocess of --baseline).
sys.path.insert(0, os.environ.get("EDGEFLEET_BENCH_CODE", str(REPO)))

from server.db import make_engine, upgrade  # noqa: E402

PG = os.environ.get(
    "EDGEFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BATCH = 10
#: The aggregate of one window of bench/telemetry.lua (as ingest stores it).
AGGREGATE = {
    "inference_count": 12,
    "error_count": 0,
    "selftest_failure_count": 0,
    "window_count": 1,
    "latency": {
        "relative_accuracy": 0.01,
        "bins": {"-345": 5, "-340": 7},
        "zero_count": 0,
        "count": 12,
        "sum": 0.012,
        "min": 0.0009,
        "max": 0.0011,
    },
    "outputs": {"label": [6, 4, 2]},
    "inputs": {"x0": [2, 8, 2]},
    "feedback": {},
    "labels": {},
    "quality": {"missing": {}, "refused": {}},
    "shadow": {},
}
DAY0 = datetime(2026, 3, 1, tzinfo=UTC)


def starts(shape: str, counter: int) -> list[datetime]:
    """The window starts of batch number ``counter`` (as bench/telemetry.lua makes them)."""
    if shape == "scattered":
        hours = [counter + w for w in range(1, BATCH + 1)]
        return [DAY0 + timedelta(days=h % 7, hours=h % 10) for h in hours]
    first = (counter * BATCH) % (7 * 24)
    return [DAY0 + timedelta(hours=(first + w) % (7 * 24)) for w in range(BATCH)]


def device_of(counter: int, devices: int) -> str:
    return f"dev-{(counter * 7 + 1301) % devices:05d}"


def make_database(kind: str, work: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{work / 'fleet.db'}"
    import psycopg

    name = f"edgefleet_benchfold_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(
        PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return PG.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    import psycopg

    with psycopg.connect(
        PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def seed_devices(engine: Engine, devices: int) -> None:
    from sqlalchemy import insert

    from server.models import Device

    now = datetime.now(UTC)
    rows = [
        {
            "id": f"dev-{i:05d}",
            "hardware_id": "phone-android",
            "generation": "phone",
            "platform": "android",
            "firmware_version": "14.0.0",
            "free_flash_bytes": 10**9,
            "free_ram_bytes": 10**9,
            "credential_hash": f"hash-{i}",
            "revoked": False,
            "enrolled_at": now,
        }
        for i in range(devices)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Device), rows)


def append(engine: Engine, shape: str, devices: int, windows: int, first_counter: int) -> None:
    """``windows`` windows in batches, as ingest appends them (unfolded)."""
    from sqlalchemy import insert
    from sqlmodel import col

    from server import partitions
    from server.models import TelemetryBatchRecord, TelemetryWindowRecord

    partitions.ensure(engine, {(DAY0 + timedelta(days=d)).date() for d in range(7)})
    now = datetime.now(UTC)
    batches = windows // BATCH
    counters = range(first_counter, first_counter + batches)
    with engine.begin() as conn:
        ids = conn.execute(
            insert(TelemetryBatchRecord).returning(col(TelemetryBatchRecord.id)),
            [
                {
                    "device_id": device_of(c, devices),
                    "boot_epoch": 1,
                    "sequence": c,
                    "window_count": BATCH,
                    "dropped_windows": 0,
                    "received_at": now,
                }
                for c in counters
            ],
        ).scalars()
        rows = [
            {
                "batch_id": batch_id,
                "device_id": device_of(c, devices),
                "hardware_id": "phone-android",
                "model": "m00",
                "version": "1.2.3",
                "bundle_sha256": "0" * 64,
                "window_start": start,
                "window_s": 3600,
                "aggregate": AGGREGATE,
                "folded": False,
            }
            for batch_id, c in zip(ids, counters, strict=True)
            for start in starts(shape, c)
        ]
        for i in range(0, len(rows), 20_000):
            conn.execute(insert(TelemetryWindowRecord), rows[i : i + 20_000])


def drain(
    engine: Engine, limit: int, folders: int, profiler: cProfile.Profile | None
) -> tuple[int, int, float, float]:
    """Fold until nothing waits: windows, rollups, seconds, and this process's CPU seconds
    (the rest of the time it waited on the database, or for a core)."""
    from sqlmodel import Session

    from server import fold

    windows = rollups = 0
    start, cpu = time.perf_counter(), time.process_time()
    with Session(engine) as session:
        while True:
            if profiler is not None:
                profiler.enable()
            if folders > 1:  # the job's rounds of folds at once (not in the first fold.py)
                done = fold.fold_round(
                    session, relative_accuracy=0.01, limit=limit, folders=folders
                )
            else:
                folded = fold.fold(session, relative_accuracy=0.01, limit=limit)
                done, rollups = folded.windows, rollups + folded.rollups
            if profiler is not None:
                profiler.disable()
            windows += done
            if done == 0:
                break
    return windows, rollups, time.perf_counter() - start, time.process_time() - cpu


def check(engine: Engine, expected: int) -> None:
    """Every window folded, once: the rollups and the fleet rollups hold exactly them."""
    from sqlalchemy import text

    with engine.connect() as conn:
        waiting = conn.execute(text("SELECT count(*) FROM telemetry_window WHERE NOT folded"))
        rolled = conn.execute(
            text("SELECT sum(window_count), sum(inference_count) FROM telemetry_rollup")
        )
        fleet = conn.execute(
            text("SELECT sum(window_count), sum(inference_count) FROM telemetry_fleet_rollup")
        )
        got = (waiting.scalar_one(), tuple(rolled.one()), tuple(fleet.one()))
    want = (0, (expected, 12 * expected), (expected, 12 * expected))
    if got != want:
        raise SystemExit(f"fold lost or doubled windows: got {got}, want {want}")


def run(
    kind: str, shape: str, args: argparse.Namespace, profiler: cProfile.Profile | None
) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="edgefleet-benchfold-"))
    url = make_database(kind, work)
    try:
        upgrade(url)
        engine = make_engine(url)
        seed_devices(engine, args.devices)
        total: list[float] = [0, 0, 0.0, 0.0]
        per_round = args.windows // args.rounds
        for r in range(args.rounds):
            append(engine, shape, args.devices, per_round, r * (per_round // BATCH))
            for i, value in enumerate(drain(engine, args.limit, args.folders, profiler)):
                total[i] += value
        check(engine, int(total[0]))
        engine.dispose()
    finally:
        drop_database(url)
        shutil.rmtree(work, ignore_errors=True)
    windows, rollups, seconds, cpu = total
    return [
        kind,
        shape,
        f"{windows:,}",
        f"{rollups:,}",
        f"{seconds:.2f}",
        f"{cpu:.2f}",
        f"{windows / seconds:,.0f}",
    ]


def in_subprocess(
    code: Path, kind: str, shape: str, args: argparse.Namespace, folders: int
) -> list[str]:
    """One case, run with the ``server`` package of ``code``."""
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--case", f"{kind}:{shape}"),
            *("--devices", str(args.devices), "--windows", str(args.windows)),
            *("--rounds", str(args.rounds), "--limit", str(args.limit)),
            *("--folders", str(folders)),
        ],
        env={**os.environ, "EDGEFLEET_BENCH_CODE": str(code)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--shapes", default="hourly,scattered")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=5000, help="Windows a fold transaction.")
    parser.add_argument(
        "--profile", help="Write cProfile stats of the folds here (and print the top)."
    )
    parser.add_argument(
        "--folders",
        type=int,
        default=1,
        help="Folds at once (server.fold.fold_round; PostgreSQL); rollups are not counted then.",
    )
    parser.add_argument("--baseline", type=Path, help="Another checkout to measure against.")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a subprocess of --baseline: one case, its row as JSON
        kind, shape = args.case.split(":")
        print(json.dumps(run(kind, shape, args, None)))
        return
    # CPU time: what this process spends, not its waits on the database.
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    table = Table(
        title=f"Fold job (server.fold, {args.limit:,} windows a transaction, {args.folders} at once"
        f" on PostgreSQL; the baseline one): {args.windows:,}"
        f" windows of {args.devices:,} devices in {args.rounds} rounds of append then fold"
    )
    columns = ["database", "batch shape", "windows", "rollups written", "seconds", "CPU s"]
    columns.append("windows/s")
    if args.baseline:
        columns += ["baseline seconds", "baseline windows/s", "ratio"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("database", "batch shape") else "right")
    for kind in args.databases.split(","):
        for shape in args.shapes.split(","):
            if args.baseline is None:
                table.add_row(*run(kind, shape, args, profiler))
                continue
            base = in_subprocess(args.baseline.resolve(), kind, shape, args, 1)
            row = in_subprocess(REPO, kind, shape, args, args.folders)
            ratio = float(row[6].replace(",", "")) / float(base[6].replace(",", ""))
            table.add_row(*row, base[4], base[6], f"{ratio:.1f}")
    Console(width=160).print(table)
    if profiler is not None:
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
