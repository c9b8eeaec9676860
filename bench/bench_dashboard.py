"""The dashboard at fleet scale: time to the first byte and to a fully drawn page for the Fleet,
Model and Rollout pages, on PostgreSQL seeded with ``--devices`` devices and ``--windows`` stored
telemetry windows with their rollups (``bench/seed_fleet.py``), served by a real `edgefleet serve`
(uvicorn, one worker, loopback).

- First byte: httpx, streamed, logged in with the session cookie; from sending the request to the
  first body byte. Baseline in the same run: ``/healthz`` and a vendored static file.
- Drawn: Debian's Chromium driven by Playwright (the browser tests' flags), from navigation start
  until every chart on the page has its uPlot canvas and two animation frames have passed
  (``performance.now()`` in the page). Baseline: the login page.
- Query costs: each page's builder run once in this process on the same database, every SQL
  statement timed with SQLAlchemy's cursor events (grouped by statement, slowest first). The
  Fleet page reads on several connections at once, so its statements overlap: their times add
  up to more than the page's.

The Model page is asked for whole days (``from``/``to`` as dates: the seven days before today),
read from the fleet rollups. Its default span (the last 7 x 24 hours) cuts two days, which are
read from the stored windows (a third of a million windows a day at this size): not measured
here (see docs/dashboard.md, "Scale").

    python bench/bench_dashboard.py --database postgresql://postgres@127.0.0.1:5432/ef_dash13 \\
        --reuse-seed --data-dir /work/seed/ef_dash13 [--runs 20] [--json out.json]
    python bench/bench_dashboard.py --database postgresql://.../ef_new --devices 100000 \\
        --windows 10000000   # seeds the (empty) database first
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_harness import port, wait  # noqa: E402
from tests.ui.fleet import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

#: The operator token the bench logs in with (its hash is put in the database if missing).
OPERATOR_TOKEN = "efa_bench_dashboard_operator"
MODEL = "wrist-activity"
ROLLOUT = "1"
#: JavaScript run after navigation: waits for every chart's canvas, then two frames.
DRAWN_JS = """async () => {
  const want = document.querySelectorAll('script[type="application/json"][data-chart]').length;
  for (let i = 0; i < 400; i++) {
    const drawn = Object.keys(window.edgefleetCharts || {}).filter(id => {
      const box = document.getElementById(id + "-plot");
      return box && box.querySelector("canvas");
    }).length;
    if (drawn >= want) break;
    await new Promise(r => setTimeout(r, 5));
  }
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return {ms: performance.now(), charts: want};
}"""


def pages(today: date) -> dict[str, str]:
    """Page name -> path, baselines first."""
    first, last = today - timedelta(days=7), today - timedelta(days=1)
    whole = f"from={first.isoformat()}&to={last.isoformat()}"
    return {
        "baseline: /healthz": "/healthz",
        "baseline: static uPlot": "/ui/static/vendor/uPlot.iife.min.js",
        "baseline: login page": "/ui/login",
        "Fleet": "/ui/",
        "Model (7 whole days)": f"/ui/models/{MODEL}?{whole}",
        "Rollout": f"/ui/rollouts/{ROLLOUT}",
    }


def ensure_operator(url: str) -> None:
    """Put the bench's operator token in the database (once)."""
    from sqlmodel import Session, create_engine, select

    from server.auth import hash_token
    from server.models import ApiToken

    engine = create_engine(url)
    with Session(engine) as session:
        digest = hash_token(OPERATOR_TOKEN)
        if session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first() is None:
            session.add(
                ApiToken(
                    name="bench-dashboard",
                    role="operator",
                    token_hash=digest,
                    created_at=datetime.now(UTC),
                )
            )
            session.commit()
    engine.dispose()


@contextmanager
def serving(url: str, data_dir: Path) -> Iterator[str]:
    srv_port = port()
    log_path = Path(tempfile.mkdtemp(prefix="bench-dashboard-")) / "server.log"
    log = log_path.open("wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet", "serve", "--data-dir", str(data_dir)),
            *("--database-url", url, "--port", str(srv_port), "--log-level", "warning"),
            *("--rollout-evaluation-s", "86400"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{srv_port}"
    try:
        wait(base)
        yield base
    finally:
        server.terminate()
        server.wait()
        log.close()
        print(f"(server log: {log_path})")


def first_byte(client: httpx.Client, path: str) -> float:
    """Seconds from sending the request to the first body byte (the rest is read, not timed)."""
    start = time.perf_counter()
    elapsed = None
    with client.stream("GET", path) as response:
        for _ in response.iter_raw(1):
            if elapsed is None:
                elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise SystemExit(f"{path}: HTTP {response.status_code}")
    return elapsed if elapsed is not None else time.perf_counter() - start


def login_client(base: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=300)
    r = client.post(
        "/ui/login",
        data={"token": OPERATOR_TOKEN},
        headers={"origin": base},
        follow_redirects=False,
    )
    if r.status_code != 303:
        raise SystemExit(f"login: HTTP {r.status_code}: {r.text[:200]}")
    return client


def drawn_times(base: str, paths: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Per page, seconds from navigation start until its charts are drawn, ``runs`` times."""
    from playwright.sync_api import sync_playwright

    found: dict[str, list[float]] = defaultdict(list)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(base + "/ui/login")
        page.fill("input[name=token]", OPERATOR_TOKEN)
        with page.expect_navigation():
            page.click("button[type=submit]")
        for _ in range(runs):
            for name, path in paths.items():
                if name.startswith("baseline:") and name != "baseline: login page":
                    continue
                page.goto(base + path, timeout=300_000)
                result = page.evaluate(DRAWN_JS)
                found[name].append(result["ms"] / 1000)
        browser.close()
    return found


def query_costs(url: str, data_dir: Path, today: date) -> dict[str, list[tuple[str, int, float]]]:
    """Per page: (statement, times run, seconds in all), every statement the page's builder runs,
    timed with SQLAlchemy's cursor events on this process's own engine."""
    from sqlalchemy import event
    from sqlmodel import Session

    from server.app import build_state
    from server.auth import Principal
    from server.config import Settings
    from server.ui.fleet_view import fleet_page
    from server.ui.model_view import model_page
    from server.ui.rollout_view import rollout_page

    state = build_state(Settings(data_dir=data_dir, database_url=url))
    who = Principal(kind="api", name="bench", role="operator")
    timings: dict[str, list[float]] = defaultdict(list)

    # Per connection: a page may read on several at once (server/concurrent_reads.py).
    @event.listens_for(state.engine, "before_cursor_execute")
    def _before(conn: Any, *_: Any) -> None:
        conn.info["bench_started"] = time.perf_counter()

    @event.listens_for(state.engine, "after_cursor_execute")
    def _after(conn: Any, _cursor: Any, statement: str, *__: Any) -> None:
        elapsed = time.perf_counter() - conn.info.pop("bench_started")
        timings[" ".join(statement.split())].append(elapsed)

    first, last = today - timedelta(days=7), today - timedelta(days=1)
    whole = {"from": first.isoformat(), "to": last.isoformat()}
    builders: dict[str, Callable[[Session], Any]] = {
        "Fleet": lambda s: fleet_page(s, state.settings, now=datetime.now(UTC), params={}),
        "Model (7 whole days)": lambda s: model_page(s, state, who, MODEL, whole),
        "Rollout": lambda s: rollout_page(s, state, who, ROLLOUT),
    }
    costs: dict[str, list[tuple[str, int, float]]] = {}
    for name, build in builders.items():
        timings.clear()
        start = time.perf_counter()
        with Session(state.engine) as session:
            build(session)
        total = time.perf_counter() - start
        rows = sorted(
            ((stmt, len(ts), sum(ts)) for stmt, ts in timings.items()),
            key=lambda r: -r[2],
        )
        costs[name] = [("(whole page, builder in this process)", 1, total), *rows]
    state.engine.dispose()
    return costs


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="postgresql://... (seeded or empty)")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--windows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--reuse-seed",
        action="store_true",
        help="The database is already seeded (by bench/seed_fleet.py, or an earlier run).",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="The seed's data directory (trust, blobs)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    url = args.database.replace("postgresql://", "postgresql+psycopg://", 1)
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / (url.rsplit("/", 1)[-1] + "-data")
    if not args.reuse_seed:
        subprocess.run(
            [
                *(sys.executable, str(REPO / "bench" / "seed_fleet.py")),
                *("--database-url", args.database, "--data-dir", str(data_dir)),
                *("--devices", str(args.devices), "--windows", str(args.windows)),
            ],
            check=True,
        )
    from server.db import upgrade

    upgrade(url)
    ensure_operator(url)
    today = datetime.now(UTC).date()
    paths = pages(today)
    ttfb: dict[str, list[float]] = defaultdict(list)
    with serving(url, data_dir) as base:
        client = login_client(base)
        for path in paths.values():  # warm: imports, caches, the first connection
            first_byte(client, path)
        for _ in range(args.runs):
            for name, path in paths.items():
                ttfb[name].append(first_byte(client, path))
        drawn = drawn_times(base, paths, args.runs)
    costs = query_costs(url, data_dir, today)
    report(args, ttfb, drawn, costs, paths)


def report(
    args: argparse.Namespace,
    ttfb: dict[str, list[float]],
    drawn: dict[str, list[float]],
    costs: dict[str, list[tuple[str, int, float]]],
    paths: dict[str, str],
) -> None:
    console = Console(width=160)
    base_ttfb = statistics.median(ttfb["baseline: /healthz"])
    table = Table(
        "page",
        "first byte p50 (ms)",
        "p95 (ms)",
        "p50 / healthz",
        "drawn p50 (ms)",
        "p95 (ms)",
        title=f"Dashboard at {args.devices:,} devices / {args.windows:,} windows on PostgreSQL"
        f" ({args.runs} runs per page; targets: p95 < 300 ms first byte, < 1000 ms drawn)",
    )
    summary: dict[str, Any] = {}
    for name in paths:
        t = ttfb[name]
        d = drawn.get(name)
        summary[name] = {
            "path": paths[name],
            "first_byte_s": {"p50": statistics.median(t), "p95": quantile(t, 0.95)},
            "drawn_s": {"p50": statistics.median(d), "p95": quantile(d, 0.95)} if d else None,
        }
        table.add_row(
            name,
            f"{statistics.median(t) * 1000:.1f}",
            f"{quantile(t, 0.95) * 1000:.1f}",
            f"{statistics.median(t) / base_ttfb:.0f}x",
            f"{statistics.median(d) * 1000:.0f}" if d else "",
            f"{quantile(d, 0.95) * 1000:.0f}" if d else "",
        )
    console.print(table)
    for page, rows in costs.items():
        qt = Table("statement", "runs", "ms", title=f"{page}: SQL statements (slowest first)")
        for stmt, n, seconds in rows[:12]:
            qt.add_row(stmt[:110], str(n), f"{seconds * 1000:.1f}")
        if len(rows) > 12:
            rest = rows[12:]
            qt.add_row(
                f"({len(rest)} more statements)",
                str(sum(r[1] for r in rest)),
                f"{sum(r[2] for r in rest) * 1000:.1f}",
            )
        console.print(qt)
    if args.json:
        summary["query_costs"] = {
            page: [{"statement": s, "runs": n, "seconds": sec} for s, n, sec in rows]
            for page, rows in costs.items()
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
