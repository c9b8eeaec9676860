"""Seed a PostgreSQL fleet database in bulk for the dashboard benchmark: devices and their
enrolments, models, versions and signed bundles, releases, a running rollout with its decision
log, telemetry batches, windows and their day rollups, and device events.

Bundles are built, signed with the data directory's release key and published through the
registry (so `edgefleet serve --data-dir DIR --database-url URL` serves them); the rest goes in
with PostgreSQL COPY, with the big tables' secondary indexes and constraints dropped during the
load and rebuilt after (as the migrations define them). The fleet itself is described in
``bench/seed_plan.py``. Prints rows/s per table and the total time.

    python bench/seed_fleet.py --database-url postgresql://postgres@127.0.0.1:5432/ef_seed \\
        --devices 100000 --windows 10000000 [--data-dir DIR] [--days 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import seed_plan as sp  # noqa: E402
from bench.seed_registry import Registry, seed_registry  # noqa: E402
from server import partitions  # noqa: E402

#: Tables COPY fills, with their secondary indexes and constraints rebuilt after the load.
BULK_TABLES = (
    "device",
    "device_state",
    "device_installed",
    "device_event",
    "cohort_member",
    "telemetry_batch",
    "telemetry_window",
    "telemetry_rollup",
)


class Timings:
    """Rows and seconds per step, printed as a table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float]] = []
        self.started = time.perf_counter()

    @contextmanager
    def step(self, name: str, counter: list[int] | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.rows.append((name, counter[0] if counter else 0, time.perf_counter() - start))
        print(f"  {name}: {self.rows[-1][2]:.1f} s", flush=True)

    def report(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table("step", "rows", "seconds", "rows/s", title="seed_fleet")
        for name, rows, seconds in self.rows:
            rate = f"{rows / seconds:,.0f}" if rows and seconds else ""
            table.add_row(name, f"{rows:,}" if rows else "", f"{seconds:.1f}", rate)
        table.add_row("total", "", f"{time.perf_counter() - self.started:.1f}", "", style="bold")
        Console(width=120).print(table)


@contextmanager
def deferred_indexes(conn: Any, tables: tuple[str, ...], timings: Timings) -> Iterator[None]:
    """Drop the tables' secondary indexes and unique/foreign-key constraints for the block, and
    rebuild them from their own definitions after it."""
    constraints: list[tuple[str, str, str]] = []
    indexes: list[tuple[str, str]] = []
    for table in tables:
        for name, definition in conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = %s::regclass AND contype IN ('u', 'f')",
            (table,),
        ):
            constraints.append((table, name, definition))
        indexes += conn.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index i"
            " WHERE indrelid = %s::regclass AND NOT indisprimary AND NOT EXISTS"
            " (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            (table,),
        ).fetchall()
    for table, name, _ in constraints:
        conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.commit()
    yield
    with timings.step(f"rebuild {len(indexes)} indexes and {len(constraints)} constraints"):
        for _, definition in indexes:
            # A partitioned table's index definition reads "ON ONLY" (the parent alone).
            conn.execute(definition.replace(" ON ONLY ", " ON ", 1))
        for table, name, definition in constraints:
            conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        conn.commit()


def copy_rows(conn: Any, table: str, columns: str, lines: Iterator[str]) -> int:
    """COPY text-format ``lines`` into ``table``; returns how many."""
    count = 0
    buffer: list[str] = []
    with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for line in lines:
            buffer.append(line)
            if len(buffer) >= 20_000:
                copy.write("".join(buffer))
                count += len(buffer)
                buffer = []
        copy.write("".join(buffer))
        count += len(buffer)
    return count


def _n(value: object) -> str:
    """A COPY text field: ``\\N`` for None."""
    return "\\N" if value is None else str(value)


def device_lines(plan: sp.Plan, registry: Registry, creds: list[str]) -> Iterator[str]:
    for d in plan.devices:
        credential = f"efd_{secrets.token_urlsafe(32)}"
        creds.append(f"{d.id} {credential}")
        installed = registry.installed_json(plan, d)
        phone = d.generation == "phone"
        flash, ram = (10**9, 10**9) if phone else (900_000, 200_000)
        yield (
            f"{d.id}\t{d.hardware_id}\t{d.generation}\t{d.platform}\t{registry.firmware(plan, d)}"
            f"\t{_n('1.20.0' if phone else None)}\t{flash}\t{ram}"
            f"\t{hashlib.sha256(credential.encode()).hexdigest()}\tf\t{_n(d.relay_id)}"
            f"\t{sp.utc(d.enrolled_at)}\t{sp.utc(plan.last_seen(d))}\t{_n(None)}\t{installed}\n"
        )


DEVICE_COLUMNS = (
    "id, hardware_id, generation, platform, firmware_version, onnxruntime_version,"
    " free_flash_bytes, free_ram_bytes, credential_hash, revoked, relay_id, enrolled_at,"
    " last_seen, last_nonce, installed"
)


def telemetry(conn: Any, plan: sp.Plan, registry: Registry, timings: Timings) -> None:
    """Batches, windows and rollups, device by device, each table through its own COPY on
    its own connection (the windows' foreign key to their batch is rebuilt after)."""
    import psycopg

    info = conn.info
    url = f"host={info.host} port={info.port} dbname={info.dbname} user={info.user}"
    conns = {name: psycopg.connect(url) for name in ("batch", "window", "rollup")}
    counts = {name: [0] for name in conns}
    columns = {
        "batch": "telemetry_batch (id, device_id, boot_epoch, sequence, window_count,"
        " dropped_windows, received_at)",
        "window": "telemetry_window (id, batch_id, device_id, hardware_id, model, version,"
        " bundle_sha256, window_start, window_s, aggregate, folded)",
        "rollup": "telemetry_rollup (id, device_id, hardware_id, generation, platform, model,"
        " version, day, inference_count, error_count, selftest_failure_count, window_count,"
        " latency, outputs, inputs, feedback, labels)",
    }
    pools: dict[tuple[str, str, str], list[sp.PoolEntry]] = {}
    days = [plan.day(i).isoformat() for i in range(plan.days)]
    for i in range(plan.days):  # the windows' day partitions (see server/partitions.py)
        conn.execute(partitions.create_statement(plan.day(i)))
    conn.commit()
    hours_today = plan.now.hour
    start = time.perf_counter()
    with (
        conns["batch"].cursor().copy(f"COPY {columns['batch']} FROM STDIN") as batches,
        conns["window"].cursor().copy(f"COPY {columns['window']} FROM STDIN") as windows,
        conns["rollup"].cursor().copy(f"COPY {columns['rollup']} FROM STDIN") as rollups,
    ):
        out: dict[str, list[str]] = {"batch": [], "window": [], "rollup": []}
        writers = {"batch": batches, "window": windows, "rollup": rollups}
        batch_id = window_id = rollup_id = 0
        rng = plan.rng
        for d in plan.devices:
            klass = sp.device_class(d.hardware_id)
            sequence = -1
            for day, arrived in plan.reporting_days(d):
                sequence += 1
                if not arrived:
                    continue
                available = 24 if day < plan.days - 1 else hours_today
                if available == 0:
                    continue
                models = plan.models_on(d, day)
                k = plan.windows_on(len(models))
                batch_id += 1
                in_batch = 0
                # The first model (wrist-activity) gets the larger half of a two-model day.
                shares = [k] if len(models) == 1 else [k - k // 2, k // 2]
                for (model, version), wanted in zip(models, shares, strict=True):
                    share = min(wanted, available)
                    if share <= 0:
                        continue
                    key = (model, version, klass)
                    pool = pools.get(key)
                    if pool is None:
                        pool = pools[key] = sp.make_pool(rng, model, version, klass)
                    entry = pool[rng.randrange(len(pool))]
                    sha = registry.sha(model, version, d.hardware_id)
                    for hour in rng.sample(range(available), share):
                        window_id += 1
                        out["window"].append(
                            f"{window_id}\t{batch_id}\t{d.id}\t{d.hardware_id}\t{model}\t{version}"
                            f"\t{sha}\t{days[day]} {hour:02d}:00:00+00\t3600\t{entry.window_json}"
                            "\tt\n"  # folded: its rollup row below holds it
                        )
                    in_batch += share
                    rollup_id += 1
                    r = entry.rollups[share]
                    out["rollup"].append(
                        f"{rollup_id}\t{d.id}\t{d.hardware_id}\t{d.generation}\t{d.platform}"
                        f"\t{model}\t{version}\t{days[day]}\t{r[0]}\t{r[1]}\t{r[2]}\t{share}"
                        f"\t{r[3]}\t{r[4]}\t{r[5]}\t{r[6]}\t{r[7]}\n"
                    )
                received = min(
                    plan.start + timedelta(days=day + 1, hours=rng.randint(0, 20)), plan.now
                )
                out["batch"].append(
                    f"{batch_id}\t{d.id}\t1\t{sequence}\t{in_batch}\t0\t{sp.utc(received)}\n"
                )
            if len(out["window"]) >= 20_000:
                for name, lines in out.items():
                    writers[name].write("".join(lines))
                    counts[name][0] += len(lines)
                    out[name] = []
            if d.index and d.index % 20_000 == 0:
                rate = counts["window"][0] / (time.perf_counter() - start)
                print(f"    {d.index:,} devices, {counts['window'][0]:,} windows ({rate:,.0f}/s)")
        for name, lines in out.items():
            writers[name].write("".join(lines))
            counts[name][0] += len(lines)
    for c in conns.values():
        c.commit()
        c.close()
    elapsed = time.perf_counter() - start
    for name in ("batch", "window", "rollup"):
        timings.rows.append((f"telemetry_{name} (one pass)", counts[name][0], elapsed))
    for table in ("telemetry_batch", "telemetry_window", "telemetry_rollup", "device_event"):
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
            f" (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
        )
    conn.commit()


def derived(database_url: str, processes: int = 3) -> None:
    """The tables the server derives from the rows COPY wrote, built as migration 0008 builds
    them from stored rows: batch counts in one statement, fleet rollups a process per group of
    days (adding millions of rollups up is Python's work)."""
    from concurrent.futures import ProcessPoolExecutor

    from sqlmodel import Session, select

    from server import batch_counts
    from server.db import make_engine
    from server.models import TelemetryRollup

    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = make_engine(url)
    with Session(engine) as session:
        batch_counts.rebuild(session)
        session.commit()
        days = sorted(set(session.exec(select(TelemetryRollup.day).distinct())))
    engine.dispose()
    groups = [days[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        rows = sum(pool.map(_fleet_rollups, [url] * processes, groups))
    print(f"    {rows:,} fleet rollup rows over {len(days)} days")


def _fleet_rollups(url: str, days: list[str]) -> int:
    from sqlmodel import Session

    from server import fleet_rollup
    from server.config import Settings
    from server.db import make_engine

    engine = make_engine(url)
    with Session(engine) as session:
        accuracy = Settings.model_fields["telemetry_relative_accuracy"].default
        rows = fleet_rollup.rebuild(session, accuracy, days)
        session.commit()
    engine.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="postgresql://... (empty database)")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--windows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("seed-data"),
        help="Trust material, bundle blobs and the devices' credentials (creds.txt).",
    )
    args = parser.parse_args()
    if not args.database_url.startswith(("postgresql://", "postgresql+psycopg://")):
        raise SystemExit("--database-url must be a postgresql:// URL (COPY is PostgreSQL's)")
    import psycopg

    timings = Timings()
    libpq_url = args.database_url.replace("postgresql+psycopg://", "postgresql://")
    now = datetime.now(UTC)
    with timings.step("plan the fleet"):
        plan = sp.Plan(args.devices, args.windows, args.days, args.seed, now)
    with timings.step("registry: bundles, releases, rollout and decisions"):
        registry = seed_registry(args.database_url, args.data_dir, plan)
    with psycopg.connect(libpq_url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '512MB'")
        with deferred_indexes(conn, BULK_TABLES, timings):
            creds: list[str] = []
            counted = [0]
            with timings.step("device", counted):
                counted[0] = copy_rows(
                    conn, "device", DEVICE_COLUMNS, device_lines(plan, registry, creds)
                )
            conn.commit()
            for table, columns, lines in registry.small_tables(plan):
                counted = [0]
                with timings.step(table, counted):
                    counted[0] = copy_rows(conn, table, columns, lines)
                conn.commit()
            with timings.step("telemetry, one pass"):
                telemetry(conn, plan, registry, timings)
        with timings.step("fleet rollups and batch counts (server.fleet_rollup, batch_counts)"):
            derived(args.database_url)
        # VACUUM as well: COPY leaves the visibility map unset, so index-only scans (the pages'
        # install outcomes, devices per version, contributors) would visit the heap for every
        # row until autovacuum (off on some servers) came by; a served fleet's tables are vacuumed.
        with timings.step("vacuum and analyze"):
            conn.autocommit = True
            conn.execute("VACUUM (ANALYZE)")
    (args.data_dir / "creds.txt").write_text("\n".join(creds) + "\n")
    timings.report()


if __name__ == "__main__":
    main()
