"""A fleet's morning sync wave against a real server: the highest rate it sustains, then 80% of it.

Seeds ``--devices`` enrolled devices in bulk (each runs two released models, as after a first
check-in), starts `edgefleet serve` (PostgreSQL by default; ``--workers N``), and runs the load
from a separate process (``generate``), open loop: syncs arrive on a schedule whatever the server
answers, and each latency is measured from when its sync was due, so a slow server cannot slow
the load down and hide its queue (coordinated omission). A sync is one device checking in and
uploading a 10-window telemetry batch of the last days (each device its own idempotency keys).
The rate follows a morning wave: a quarter of the peak, rising to the peak in the middle of the
run and falling back.

First a search: steps of ``--step-s`` seconds at rising peak rates (doubling, then halving the
gap) until a step fails (any 5xx or transport error, under 95% of due syncs done, or a check-in
p99 over ``--p99-ceiling-ms``, 250 ms by default); the highest step that passed is the sustained
rate: the server kept up with the wave's crest, answering within a quarter of a second, in each
of ``--trials`` runs (2 by default). With a 1 s ceiling and one run, a step passed while the
server queued for most of a second at the crest, so 80% of that rate was still at the server's
limit, and which steps passed varied from run to run.
Then ``--run-s`` seconds at 80% of it, with p50/p99 latency and errors per route
(``--timeline``: per second). Steps as long as the run see the same wave; shorter steps find a
higher rate, since a short peak's queue drains before it shows. ``--at RATE``: no search, one
run at that peak rate.

    python bench/load_fleet.py [--devices 100000] [--database postgresql|sqlite] [--workers 1]
        [--step-s 20] [--run-s 20] [--p99-ceiling-ms 250] [--trials 2] [--at RATE] [--timeline]
        [--connections 128] [--json]

The generator is Python (aiohttp, every request body built before the clock starts): its own CPU
time while it sends is printed, since on a small machine it may be the limit rather than the
server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_harness import PG, port, seed, wait  # noqa: E402
from edgefleet.server_cli import init_trust  # noqa: E402

ROUTES = ("check-in", "telemetry")
#: A step fails when fewer of its due syncs are done, or check-in p99 exceeds the ceiling
#: (``--p99-ceiling-ms``: past a quarter of a second the server is queueing at the wave's crest).
DONE_FLOOR = 0.95
P99_CEILING_MS = 250.0
WINDOWS_PER_BATCH = 10


# -- the generator (a separate process) --------------------------------------------------------


def wave(t: float, length: float) -> float:
    """The morning wave's share of the peak rate at ``t`` seconds into a ``length``-second run."""
    return 0.25 + 0.75 * math.exp(-(((t - length / 2) / (length / 6)) ** 2))


def schedule(peak: float, length: float, rng: random.Random) -> list[float]:
    """Due times of syncs (a Poisson process whose rate follows :func:`wave`, by thinning)."""
    due: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= length:
            return due
        if rng.random() < wave(t, length):
            due.append(t)


def batch_body(device_id: str, bundle: str, boot_epoch: int, sequence: int) -> bytes:
    """A 10-window telemetry batch of the last days, as the agent uploads one."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    windows = []
    for w in range(WINDOWS_PER_BATCH):
        start = today - timedelta(days=1 + w % 3, hours=-(sequence + w) % 24)
        windows.append(
            {
                "device_id": device_id,
                "model": "m00",
                "version": "1.2.3",
                "bundle_sha256": bundle,
                "window_start": start.isoformat(),
                "window_s": 3600,
                "inference_count": 12,
                "error_count": 0,
                "latency": {
                    "relative_accuracy": 0.01,
                    "bins": {"-345": 5, "-340": 7},
                    "count": 12,
                    "sum": 0.012,
                    "min": 0.0009,
                    "max": 0.0011,
                },
                "outputs": [{"name": "label", "counts": [6, 4, 2]}],
                "inputs": [{"name": "x0", "counts": [2, 8, 2]}],
            }
        )
    body = {
        "device_id": device_id,
        "boot_epoch": boot_epoch,
        "sequence": sequence,
        "windows": windows,
    }
    return json.dumps(body).encode()


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROUTES})
    #: Per check-in: the second of the run it was due in, and its latency.
    check_ins: list[tuple[int, float]] = field(default_factory=list)
    errors: dict[str, dict[str, int]] = field(default_factory=lambda: {r: {} for r in ROUTES})
    due: int = 0
    done: int = 0

    def error(self, route: str, what: str) -> None:
        self.errors[route][what] = self.errors[route].get(what, 0) + 1


#: One sync: its headers, and each request's route, path and body.
Sync = tuple[dict[str, str], tuple[tuple[str, str, bytes], ...]]


def requests_of(args: argparse.Namespace, due: list[float], rng: random.Random) -> list[Sync]:
    """Each due sync's headers and its two requests (route, path, body), built before the clock
    starts so the generator's CPU goes to sending, not to JSON."""
    creds = [line.split() for line in Path(args.creds).read_text().split("\n") if line]
    installed = json.loads(Path(args.installed).read_text())
    bundle = Path(args.bundle).read_text().strip()
    order = list(range(len(creds)))
    rng.shuffle(order)
    boot_epoch = int(time.time())
    syncs: list[Sync] = []
    for k in range(len(due)):
        device_id, credential = creds[order[k % len(order)]]
        check_in = {
            "device_id": device_id,
            "nonce": uuid.UUID(int=rng.getrandbits(128)).hex,
            "firmware_version": "14.0.0",
            "installed": installed,
        }
        syncs.append(
            (
                {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
                (
                    (
                        "check-in",
                        f"/v1/devices/{device_id}/check-in",
                        json.dumps(check_in).encode(),
                    ),
                    (
                        "telemetry",
                        f"/v1/devices/{device_id}/telemetry",
                        batch_body(device_id, bundle, boot_epoch, k),
                    ),
                ),
            )
        )
    return syncs


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    """One open-loop run. aiohttp (its C HTTP parser), not httpx: on a two-core machine the
    generator shares the cores with the server, and httpx cost about 2.6 ms of CPU a request."""
    import aiohttp

    rng = random.Random(args.seed)
    due = schedule(args.rate, args.seconds, rng)
    syncs = requests_of(args, due, rng)
    tally = Tally(due=len(due))

    async def sync(client: aiohttp.ClientSession, k: int, at: float, start: float) -> None:
        headers, steps = syncs[k]
        began = start + at  # the first request is timed from when the sync was due
        for route, path, body in steps:
            try:
                async with client.post(path, data=body, headers=headers) as answer:
                    await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.error(route, type(exc).__name__)
                return
            latency = time.perf_counter() - began
            tally.latencies[route].append(latency)
            if route == "check-in":
                tally.check_ins.append((int(at), latency))
            if status >= 400:
                tally.error(route, str(status))
                return
            began = time.perf_counter()
        tally.done += 1

    # The generator's own collector pauses would be counted as the server's latency: what was
    # built beforehand is frozen, and the collector is off while the clock runs.
    gc.collect()
    gc.freeze()
    gc.disable()
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(args.url, connector=connector, timeout=timeout) as client:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        tasks = []
        for k, at in enumerate(due):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(sync(client, k, at, start)))
        await asyncio.gather(*tasks)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gc.enable()
    return {
        "rate": args.rate,
        "due": tally.due,
        "done": tally.done,
        "latencies": tally.latencies,
        "check_ins": tally.check_ins,
        "errors": tally.errors,
        "generator_cpu_s": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
        "seconds": args.seconds,
    }


# -- the driver ---------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(step: dict[str, Any], p99_ceiling_ms: float = P99_CEILING_MS) -> str | None:
    """Why a step failed, or None if the server sustained it."""
    errors = {r: e for r, e in step["errors"].items() if e}
    if errors:
        return f"errors {errors}"
    if step["done"] < DONE_FLOOR * step["due"]:
        return f"{step['done']} of {step['due']} syncs done"
    p99 = quantile(step["latencies"]["check-in"], 0.99)
    if p99 * 1e3 > p99_ceiling_ms:
        return f"check-in p99 {p99 * 1e3:.0f} ms"
    return None


def run_step(fleet: dict[str, Path], url: str, rate: float, seconds: float, args: Any) -> dict:
    out = fleet["work"] / f"step-{rate:.0f}.json"
    subprocess.run(
        [
            sys.executable,
            __file__,
            "generate",
            *("--url", url, "--rate", str(rate), "--seconds", str(seconds)),
            *("--creds", str(fleet["creds"]), "--installed", str(fleet["installed"])),
            *("--bundle", str(fleet["bundle"]), "--out", str(out)),
            *("--connections", str(args.connections), "--seed", str(args.seed)),
        ],
        check=True,
    )
    return dict(json.loads(out.read_text()))


def summary(step: dict[str, Any]) -> str:
    ci = step["latencies"]["check-in"]
    return (
        f"peak {step['rate']:.0f} syncs/s: {step['done']}/{step['due']} done,"
        f" check-in p50 {quantile(ci, 0.5) * 1e3:.1f} ms p99 {quantile(ci, 0.99) * 1e3:.1f} ms,"
        f" generator CPU {step['generator_cpu_s']:.1f} s of {step['seconds']:.0f} s"
    )


def start_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], str, dict]:
    data_dir = work / "data"
    data_dir.mkdir()
    init_trust(data_dir)
    if args.database == "sqlite":
        url = f"sqlite:///{data_dir / 'fleet.db'}"
    else:
        import psycopg

        name = f"ef_load_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = PG.rsplit("/", 1)[0] + "/" + name
    print(f"seeding {args.devices:,} devices ...", flush=True)
    began = time.perf_counter()
    creds = seed(url, data_dir, args.devices, models=4, assigned=2)
    print(f"  seeded in {time.perf_counter() - began:.0f} s", flush=True)
    server_port = port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet", "serve", "--data-dir", str(data_dir)),
            *("--database-url", url, "--port", str(server_port), "--log-level", "warning"),
            *("--workers", str(args.workers)),
        ],
        stdout=(work / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{server_port}"
    wait(base)
    fleet = {
        "work": work,
        "creds": creds,
        "installed": data_dir / "installed.json",
        "bundle": data_dir / "telemetry_bundle.txt",
        "url": url,
    }
    return server, base, fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="(internal) one open-loop run; writes --out")
    for name, kind in (("url", str), ("creds", str), ("installed", str), ("bundle", str)):
        gen.add_argument(f"--{name}", type=kind, required=True)
    gen.add_argument("--rate", type=float, required=True, help="peak syncs/s")
    gen.add_argument("--seconds", type=float, required=True)
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--connections", type=int, default=128)
    gen.add_argument("--seed", type=int, default=1)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--start-rate", type=float, default=50.0, help="first step, syncs/s")
    # Steps as long as the run, so both see the same wave (a short crest's queue drains unseen).
    parser.add_argument("--step-s", type=float, default=20.0)
    parser.add_argument("--run-s", type=float, default=20.0)
    parser.add_argument(
        "--p99-ceiling-ms",
        type=float,
        default=P99_CEILING_MS,
        help="a search step fails when its check-in p99 is over this (e.g. 100: the highest rate"
        " within a latency objective)",
    )
    parser.add_argument(
        "--trials", type=int, default=2, help="runs of a search step that must all pass"
    )
    parser.add_argument(
        "--at", type=float, help="skip the search: one run at this peak rate (syncs/s)"
    )
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also print, per second of the final run, syncs due and check-in p50/p99",
    )
    args = parser.parse_args()

    if args.command == "generate":
        result = asyncio.run(generate(args))
        args.out.write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="edgefleet-load-"))
    server, base, fleet = start_server(args, work)
    try:
        passed: dict[str, Any] | None = None
        low, high, rate = 0.0, math.inf, args.start_rate
        while args.at is None:  # double until a step fails, then halve the gap three times
            # A rate is sustained only if every one of --trials runs of it passes: near the
            # server's limit one run's tail is luck (the fold's moment, the host's neighbours).
            for _ in range(args.trials):
                step = run_step(fleet, base, rate, args.step_s, args)
                why = verdict(step, args.p99_ceiling_ms)
                print(f"  {summary(step)}: {why or 'sustained'}", flush=True)
                if why is not None:
                    break
            if why is None:
                low, passed = rate, step
            else:
                high = rate
            if high == math.inf:
                rate *= 2
            elif high - low <= max(10.0, 0.1 * low):
                break
            else:
                rate = (low + high) / 2
            if low == 0 and rate < 1:
                break
        if args.at is not None:
            low = args.at / 0.8
        elif passed is None:
            raise SystemExit(f"the server sustained no step down to {rate:.1f} syncs/s")
        final = run_step(fleet, base, 0.8 * low, args.run_s, args)
    finally:
        server.terminate()
        server.wait(30)
        if args.database == "postgresql":
            import psycopg

            name = fleet["url"].rsplit("/", 1)[1]
            with psycopg.connect(PG.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result = {
        "devices": args.devices,
        "database": args.database,
        "workers": args.workers,
        "sustained_peak_syncs_per_s": None if args.at is not None else low,
        "run_peak_syncs_per_s": 0.8 * low,
        "routes": {
            route: {
                "requests": len(final["latencies"][route]),
                "p50_ms": quantile(final["latencies"][route], 0.5) * 1e3,
                "p99_ms": quantile(final["latencies"][route], 0.99) * 1e3,
                "errors": final["errors"][route],
            }
            for route in ROUTES
        },
        "done": final["done"],
        "due": final["due"],
        "generator_cpu_s": final["generator_cpu_s"],
        "seconds": args.run_s,
    }
    if args.timeline:
        result["timeline"] = timeline(final)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    shutil.rmtree(work, ignore_errors=True)


def timeline(step: dict[str, Any]) -> list[dict[str, float]]:
    """Per second of a run: the check-ins due in it, and their p50 and p99 latency (ms)."""
    seconds: dict[int, list[float]] = {}
    for second, latency in step["check_ins"]:
        seconds.setdefault(second, []).append(latency)
    return [
        {
            "second": second,
            "check_ins": len(values),
            "p50_ms": quantile(values, 0.5) * 1e3,
            "p99_ms": quantile(values, 0.99) * 1e3,
        }
        for second, values in sorted(seconds.items())
    ]


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"{result['devices']:,} devices, {result['database']}, {result['workers']} worker(s):"
            + (
                ""
                if result["sustained_peak_syncs_per_s"] is None
                else f" sustained peak {result['sustained_peak_syncs_per_s']:.0f} syncs/s;"
            )
            + " run at"
            f" {result['run_peak_syncs_per_s']:.0f} for {result['seconds']:.0f} s"
            f" ({result['done']}/{result['due']} syncs done)"
        )
    )
    for column in ("route", "requests", "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for route, row in result["routes"].items():
        table.add_row(
            route,
            f"{row['requests']:,}",
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
            ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0",
        )
    Console().print(table)
    print(f"generator CPU: {result['generator_cpu_s']:.1f} s over {result['seconds']:.0f} s")
    for row in result.get("timeline", []):
        print(
            f"  second {row['second']:3.0f}: {row['check_ins']:4.0f} check-ins,"
            f" p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms"
        )


if __name__ == "__main__":
    main()
