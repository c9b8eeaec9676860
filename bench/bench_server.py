"""Fleet server throughput under load from a separate process (wrk), against a bare endpoint.

For SQLite and PostgreSQL: 10,000 enrolled devices and 20 models in the database (each model has
a released phone-android bundle; each device runs ``--assigned`` of them), a real `edgefleet
serve` process (uvicorn, one worker, loopback), and wrk at fixed concurrency sending check-ins
(nonce, one director-signed assignment set, compatibility, last-seen write) and telemetry batches.
Baselines: a bare FastAPI endpoint on the same uvicorn answering the same requests with a body of
the same size, declared ``async def`` (as the server's routes are) and ``def`` (run in FastAPI's
threadpool), measured in the same run, interleaved with the server. A third, the floor, does only
what no implementation of the route can skip (check-in: read the body and sign the answer with
Ed25519; telemetry: read the body and validate it as a batch; bench/bare_app.py): its ratio to
the bare ``async def`` endpoint is the highest ratio the server could reach.

Telemetry ingest is measured with the server's fold job idle; then the backlog it left is folded
by the fold job's code in this process (folded windows/s), and ingest measured again while that
folder drains what arrives (a third table). ``--telemetry-shape`` sets what a batch holds
(bench/telemetry.lua): ``hourly`` (the default), consecutive hourly windows over one or two
event-time days, as a device syncing uploads them, so a batch folds into one or two day rollups;
``scattered``, the shape this bench had first, each batch's windows one per day over seven days,
so nearly every window folds into a day rollup of its own (the fold's worst case: compare the
fold figures of the two shapes, never across them).

A second table: check-in requests/s alone, and while distinct ``--publish-mb`` bundles (for
devboard-rpi4, whose 64 MiB budget allows them; built before the run) are published back to back
for the whole of the wrk run, from a thread of this process streaming them from disk.

On PostgreSQL, a last table: check-in on `edgefleet serve --workers N` (another port, the same
database) against the one-worker server measured just before and just after it.

    python bench/bench_server.py [--duration 10] [--connections 16] [--assigned 4] [--publish-mb 50]
        [--workers 2] [--databases sqlite,postgresql] [--telemetry-shape hourly|scattered]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_harness import (  # noqa: E402
    PG,
    PUBLISHER_TOKEN,
    port,
    response_size,
    seed,
    start_bare,
    wait,
    wrk,
)
from edgefleet.server_cli import init_trust  # noqa: E402
from firmware_bundles import SigningKey, build  # noqa: E402
from tests.conftest import manifest_draft  # noqa: E402


def big_bundles(work: Path, data_dir: Path, count: int, megabytes: int) -> list[Path]:
    """``count`` distinct bundles of about ``megabytes`` MB for devboard-rpi4, written to files."""
    key = SigningKey.from_pem((data_dir / "keys" / "release.pem").read_bytes())
    paths = []
    for i in range(count):
        draft = manifest_draft(
            name="big",
            version=f"1.0.{i}",
            release_counter=i,
            targets=[
                {
                    "target_id": "devboard-rpi4",
                    "generation": "devboard",
                    "platform": "rpi4",
                    "firmware": {"minimum": "1.0.0"},
                }
            ],
        )
        path = work / f"big-{i}.bundle"
        path.write_bytes(build(draft, {"model.onnx": os.urandom(megabytes * 10**6)}, [key]))
        paths.append(path)
    return paths


class Publisher(threading.Thread):
    """Publishes the bundles back to back, streamed from disk, until stopped (or out of them)."""

    def __init__(self, url: str, bundles: list[Path]) -> None:
        super().__init__(daemon=True)
        self.url, self.bundles = url, bundles
        self.stop = threading.Event()
        self.published = self.failed = self.bytes = 0
        self.started_at = self.elapsed_s = 0.0
        self.ran_out = False

    def run(self) -> None:
        self.started_at = time.perf_counter()
        headers = {
            "Authorization": f"Bearer {PUBLISHER_TOKEN}",
            "Content-Type": "application/octet-stream",
        }
        with httpx.Client(timeout=300) as client:
            for path in self.bundles:
                if self.stop.is_set():
                    break
                with path.open("rb") as body:
                    r = client.post(f"{self.url}/v1/bundles", content=body, headers=headers)
                if r.status_code == 201:
                    self.published += 1
                    self.bytes += path.stat().st_size
                else:
                    self.failed += 1
            else:
                self.ran_out = not self.stop.is_set()
        self.elapsed_s = time.perf_counter() - self.started_at


def publish_case(
    kind: str, server_url: str, work: Path, data_dir: Path, creds: Path, args: argparse.Namespace
) -> list[str]:
    """Check-in alone, then during back-to-back publishes, in this run; the table row."""
    bundles = big_bundles(work, data_dir, 2 * args.duration + 4, args.publish_mb)
    alone, _ = wrk(server_url, "checkin.lua", creds, args.duration, args.connections)
    publisher = Publisher(server_url, bundles)
    publisher.start()
    time.sleep(0.5)  # the first upload is under way before wrk starts
    during, bad = wrk(server_url, "checkin.lua", creds, args.duration, args.connections)
    publisher.stop.set()
    publisher.join()
    return [
        kind,
        f"{alone:,.0f}",
        f"{during:,.0f}",
        f"{during / alone:.2f}",
        str(bad),
        f"{publisher.published}" + (" (ran out)" if publisher.ran_out else ""),
        str(publisher.failed),
        f"{publisher.bytes / 1e6 / max(publisher.elapsed_s, 1e-9):,.0f}",
    ]


def unfolded_windows(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM telemetry_window WHERE NOT folded")
                ).scalar_one()
            )
    finally:
        engine.dispose()


class Folder(threading.Thread):
    """The fold job's work (``server.fold.fold_round``: 5,000 windows a transaction, as many
    folds at once as the server's default ``telemetry_fold_folders`` on PostgreSQL, one on
    SQLite) in a thread of this process, until nothing waits or it is stopped; counts windows
    and seconds."""

    def __init__(self, url: str, *, until_empty: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.until_empty = url, until_empty
        self.stop = threading.Event()
        self.windows = 0
        self.elapsed_s = 0.0

    def run(self) -> None:
        from sqlmodel import Session

        from server import fold
        from server.config import Settings
        from server.db import make_engine

        folders = Settings.model_fields["telemetry_fold_folders"].default
        engine = make_engine(self.url)
        with Session(engine) as session:
            session.connection()  # connected before the clock starts, as the job's pool is
            start = time.perf_counter()
            while not self.stop.is_set():
                done = fold.fold_round(session, relative_accuracy=0.01, limit=5000, folders=folders)
                self.windows += done
                if done == 0:
                    if self.until_empty:
                        break
                    time.sleep(0.2)
            self.elapsed_s = time.perf_counter() - start
        engine.dispose()


def fold_case(
    kind: str, url: str, server_url: str, creds: Path, args: argparse.Namespace, bare: float
) -> tuple[list[str], list[str]]:
    """The backlog the ingest run left, folded as fast as the job folds; then ingest again while
    a folder drains what arrives. Returns the fold table's row and the main table's row."""
    backlog = unfolded_windows(url)
    drain = Folder(url, until_empty=True)
    drain.run()
    fold_row = [
        kind,
        f"{backlog:,}",
        f"{drain.windows:,}",
        f"{drain.elapsed_s:.1f}",
        f"{drain.windows / max(drain.elapsed_s, 1e-9):,.0f}",
    ]
    folder = Folder(url, until_empty=False)
    folder.start()
    real, bad = wrk(server_url, "telemetry.lua", creds, args.duration, args.connections)
    folder.stop.set()
    folder.join()
    fold_row.append(f"{folder.windows / max(folder.elapsed_s, 1e-9):,.0f}")
    main_row = [
        kind,
        f"telemetry ({args.windows} windows/batch), folding meanwhile",
        "",
        f"{bare:,.0f}",
        "",
        f"{real:,.0f}",
        f"{real / bare:.2f}",
        "",
        "",
        "",
        str(bad),
        f"{real * args.windows:,.0f}",
    ]
    return fold_row, main_row


def workers_case(
    url: str, data_dir: Path, creds: Path, server_url: str, args: argparse.Namespace
) -> list[str]:
    """Check-in on the one-worker server, then on `serve --workers N` over the same database
    (its own port), then one worker again, in this run; the table row."""
    many_port = port()
    many = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet", "serve", "--data-dir", str(data_dir)),
            *("--database-url", url, "--port", str(many_port), "--log-level", "warning"),
            *("--workers", str(args.workers)),
        ],
        env={**os.environ, "EDGEFLEET_TELEMETRY_FOLD_S": "3600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    many_url = f"http://127.0.0.1:{many_port}"
    try:
        wait(many_url)
        one_before, _ = wrk(server_url, "checkin.lua", creds, args.duration, args.connections)
        several, bad = wrk(many_url, "checkin.lua", creds, args.duration, args.connections)
        one_after, _ = wrk(server_url, "checkin.lua", creds, args.duration, args.connections)
    finally:
        many.terminate()
        many.wait()
    one = (one_before + one_after) / 2
    return [
        f"{one_before:,.0f} / {one_after:,.0f}",
        str(args.workers),
        f"{several:,.0f}",
        f"{several / one:.2f}",
        str(bad),
    ]


def run_database(
    kind: str,
    args: argparse.Namespace,
    table: Table,
    publish_table: Table,
    fold_table: Table,
    workers_table: Table,
) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"edgefleet-bench-{kind}-"))
    data_dir = work / "data"
    init_trust(data_dir)
    if kind == "sqlite":
        url = f"sqlite:///{data_dir / 'fleet.db'}"
    else:
        import psycopg

        name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        admin = PG.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = PG.rsplit("/", 1)[0] + "/" + name
    creds = seed(url, data_dir, args.devices, args.models, args.assigned)
    srv_port = port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--database-url",
            url,
            "--port",
            str(srv_port),
            "--log-level",
            "warning",
        ],
        # The fold job runs once at start (nothing waits then): the bench folds in its own
        # process (fold_case), so ingest and fold are measured apart and then together.
        env={**os.environ, "EDGEFLEET_TELEMETRY_FOLD_S": "3600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server_url = f"http://127.0.0.1:{srv_port}"
    try:
        wait(server_url)
        size = response_size(server_url, creds)
        bares = {mode: start_bare(mode, size) for mode in ("async", "sync", "floor")}
        try:
            for script, label in (
                ("checkin.lua", "check-in"),
                ("telemetry.lua", f"telemetry ({args.windows} windows/batch)"),
            ):
                base_async = wrk(bares["async"][1], script, creds, args.duration, args.connections)
                real, bad = wrk(server_url, script, creds, args.duration, args.connections)
                base_sync = wrk(bares["sync"][1], script, creds, args.duration, args.connections)
                floor, floor_bad = wrk(
                    bares["floor"][1], script, creds, args.duration, args.connections
                )
                if floor_bad:
                    raise SystemExit(f"the floor baseline refused {floor_bad} {label} requests")
                windows = real * args.windows if script == "telemetry.lua" else None
                table.add_row(
                    kind,
                    label,
                    f"{size} B" if script == "checkin.lua" else "",
                    f"{base_async[0]:,.0f}",
                    f"{base_sync[0]:,.0f}",
                    f"{real:,.0f}",
                    f"{real / base_async[0]:.2f}",
                    f"{real / base_sync[0]:.2f}",
                    f"{floor:,.0f}",
                    f"{floor / base_async[0]:.2f}",
                    str(bad),
                    "" if windows is None else f"{windows:,.0f}",
                )
                if script == "telemetry.lua":
                    fold_row, main_row = fold_case(
                        kind, url, server_url, creds, args, base_async[0]
                    )
                    fold_table.add_row(*fold_row)
                    table.add_row(*main_row)
        finally:
            for process, _ in bares.values():
                process.terminate()
                process.wait()
        if args.publish_mb:
            publish_table.add_row(*publish_case(kind, server_url, work, data_dir, creds, args))
        if args.workers > 1 and kind == "postgresql":  # SQLite serves from one process
            workers_table.add_row(*workers_case(url, data_dir, creds, server_url, args))
    finally:
        server.terminate()
        server.wait()
        if kind == "postgresql":
            import psycopg

            with psycopg.connect(
                PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
            ) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--assigned", type=int, default=4, help="Models each device runs.")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--telemetry-shape",
        choices=("hourly", "scattered"),
        default="hourly",
        help="What a telemetry batch holds (see above and bench/telemetry.lua).",
    )
    parser.add_argument(
        "--publish-mb",
        type=int,
        default=50,
        help="Size of the bundles published during the check-in-while-publishing case (0: skip).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Check-in on `serve --workers N` against one worker, on PostgreSQL (1: skip).",
    )
    args = parser.parse_args()
    os.environ["EDGEFLEET_BENCH_WINDOWS"] = str(args.windows)
    os.environ["EDGEFLEET_BENCH_SHAPE"] = args.telemetry_shape
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    table = Table(
        title=f"Fleet server under wrk (-t2 -c{args.connections}, {args.duration}s);"
        f" {args.devices} devices, {args.models} models, {args.assigned} assigned;"
        f" {args.telemetry_shape} telemetry batches"
    )
    for col in (
        "database",
        "request",
        "body",
        "bare async req/s",
        "bare def req/s",
        "server req/s",
        "vs async",
        "vs def",
        "floor req/s",
        "floor vs async",
        "non-2xx",
        "windows/s",
    ):
        table.add_column(col, justify="left" if col in ("database", "request") else "right")
    publish_table = Table(
        title=f"Check-in (wrk -t2 -c{args.connections}, {args.duration}s) alone and while"
        f" distinct {args.publish_mb} MB devboard-rpi4 bundles are published back to back"
    )
    for col in (
        "database",
        "check-in alone req/s",
        "during publishes req/s",
        "ratio",
        "non-2xx",
        "bundles published",
        "publish failures",
        "MB/s published",
    ):
        publish_table.add_column(col, justify="left" if col == "database" else "right")
    fold_table = Table(
        title="Fold job: the ingest run's backlog folded into day rollups (server.fold.fold_round:"
        " 5,000 windows a transaction, two at once on PostgreSQL;"
        f" {args.telemetry_shape} batches), and folding while ingest runs"
    )
    for col in (
        "database",
        "backlog windows",
        "folded",
        "seconds",
        "folded windows/s",
        "windows/s folded during ingest",
    ):
        fold_table.add_column(col, justify="left" if col == "database" else "right")
    workers_table = Table(
        title=f"Check-in (wrk -t2 -c{args.connections}, {args.duration}s) on PostgreSQL: one worker"
        f" (before / after) against `serve --workers {args.workers}` on the same database"
    )
    for col in ("one worker req/s", "workers", "req/s", "ratio", "non-2xx"):
        workers_table.add_column(col, justify="right")
    for kind in args.databases.split(","):
        run_database(kind, args, table, publish_table, fold_table, workers_table)
    console = Console(width=190)
    console.print(table)
    console.print(fold_table)
    if args.publish_mb:
        console.print(publish_table)
    if args.workers > 1 and "postgresql" in args.databases:
        console.print(workers_table)


if __name__ == "__main__":
    main()
