"""A realistic fleet behind a real server, and Chromium to look at its dashboard: shared by the
browser tests and ``make screenshots`` (tools/screenshots.py).

The fleet: one model in three versions with bundles for phones and rings (2.0.0 converted from
an MLflow registry entry, 1.1.0 from an MLflow run); Android phones in a staged rollout of 2.0.0
against 1.0.0 (started three days ago, evaluated after each day's uploads); rings relayed by
phones, on 1.0.0 and three pinned to 1.1.0 (fewer devices than the server shows figures for),
one that tried 1.1.0 and reverted; iPhones and Raspberry Pis with no bundle; some devices silent
or never seen; installs spread over the past days; six days of hourly windows (three a day) with
labels that thin out towards today.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import insert, update
from sqlmodel import Session, select

from firmware_bundles import SigningKey
from firmware_bundles import telemetry as sketch
from server.auth import hash_token
from server.db import make_engine
from server.models import Device, DeviceEvent, Rollout
from tests.procs import ServerProcess
from tests.server.conftest import CAPS, make_bundle, mlflow_source
from tests.server.test_hil_gate import report

MODEL = "wrist-activity"
VERSIONS = {"1.0.0": 1, "1.1.0": 2, "2.0.0": 3}
TARGETS = ("phone-android", "ring-gen3")
CLASSES = ["rest", "move"]
EDGES = {"x0": [-2.0, -1.0, 0.0, 1.0, 2.0], "x1": [0.0, 0.5, 1.0]}
REFERENCE = {
    "inputs": [
        {"name": "x0", "kind": "numeric", "edges": EDGES["x0"], "counts": [5, 10, 35, 35, 10, 5]},
        {"name": "x1", "kind": "numeric", "edges": EDGES["x1"], "counts": [10, 40, 40, 10]},
    ],
    "outputs": [
        {"name": "label", "kind": "categorical", "categories": CLASSES, "counts": [60, 40, 0]}
    ],
}
DAYS = 6
HOURS = (3, 11, 19)
ROLLOUT_DAYS_AGO = 3
#: Where versions came from in MLflow (the lineage page links there; nothing fetches it).
MLFLOW_URI = "http://127.0.0.1:5000"
MLFLOW = {
    "2.0.0": {
        **mlflow_source("4f1c0a9e2b7d4c1e8a6f3b2d1c0e9f8a", MODEL, "7", MLFLOW_URI),
        "experiment_id": "3",
        "params": {"n_estimators": "200", "max_depth": "8"},
        "metrics": {"accuracy": 0.913},
        "datasets": [
            {"name": "wrist-2026-10", "digest": "a1b2c3d4", "context": "training"},
            {"name": "wrist-2026-10-eval", "digest": "e5f6a7b8", "context": "eval"},
        ],
    },
    "1.1.0": mlflow_source("9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a", tracking_uri=MLFLOW_URI),
}
#: The ring that tried 1.1.0 and went back to 1.0.0 (its events: install, then revert).
REVERTED_RING = "ring-03"
EXTRA_CAPS = {
    "phone-ios": {
        "hardware_id": "phone-ios",
        "generation": "phone",
        "platform": "ios",
        "firmware_version": "17.0.0",
        "free_flash_bytes": 10**9,
        "free_ram_bytes": 10**9,
    },
    "devboard-rpi4": {
        "hardware_id": "devboard-rpi4",
        "generation": "devboard",
        "platform": "rpi4",
        "firmware_version": "1.2.0",
        "free_flash_bytes": 10**9,
        "free_ram_bytes": 10**9,
    },
}
#: Chromium as Debian ships it (``EDGEFLEET_CHROMIUM`` names another); never a browser
#: Playwright downloads.
CHROMIUM = Path(os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium"))
#: Headless without Chromium's own connections (refused by a closed network, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class SeededFleet:
    """The running server, a token per role, and what was seeded."""

    server: ServerProcess
    client: httpx.Client
    tokens: dict[str, str]
    rollout_id: int
    today: date
    devices: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.server.url

    def api(self, path: str, role: str = "operator", **params: Any) -> Any:
        """A GET of the API (or a JSON twin) as ``role``; the JSON answer."""
        r = self.client.get(
            path, params=params, headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    @property
    def span(self) -> dict[str, str]:
        """The event-time span the tests ask pages and API about (whole days up to today)."""
        return {
            "from": (self.today - timedelta(days=DAYS - 1)).isoformat(),
            "to": self.today.isoformat(),
        }


def _post(client: httpx.Client, path: str, token: str, body: Any, expect: int = 200) -> Any:
    r = client.post(
        path,
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == expect, f"{path}: {r.status_code} {r.text}"
    return r.json()


def _devices() -> dict[str, tuple[str, str | None]]:
    """Device id -> (hardware id, relay id)."""
    devices: dict[str, tuple[str, str | None]] = {}
    for i in range(40):
        devices[f"phone-{i:03d}"] = ("phone-android", None)
    for i in range(12):
        devices[f"ring-{i:02d}"] = ("ring-gen3", f"phone-{i:03d}")
    for i in range(4):
        devices[f"iphone-{i}"] = ("phone-ios", None)
    for i in range(3):
        devices[f"rpi-{i}"] = ("devboard-rpi4", None)
    return devices


def _enroll(engine: Any, now: datetime) -> dict[str, str]:
    """Every device straight into the database (enrollment is tested elsewhere); id ->
    credential."""
    creds = {}
    rows = []
    for device_id, (hardware_id, relay) in _devices().items():
        caps = {**CAPS, **EXTRA_CAPS}[hardware_id]
        creds[device_id] = f"efd_{uuid.uuid4().hex}"
        rows.append(
            {
                "id": device_id,
                "hardware_id": hardware_id,
                "generation": caps["generation"],
                "platform": caps["platform"],
                "firmware_version": caps["firmware_version"],
                "free_flash_bytes": caps["free_flash_bytes"],
                "free_ram_bytes": caps["free_ram_bytes"],
                "credential_hash": hash_token(creds[device_id]),
                "revoked": False,
                "relay_id": relay,
                "enrolled_at": now - timedelta(days=30),
            }
        )
    with Session(engine) as session:
        session.execute(insert(Device), rows)
        session.commit()
    return creds


def _check_in(client: httpx.Client, device: str, cred: str, installed: list[Any]) -> dict[str, Any]:
    hardware_id = _devices()[device][0]
    body = {
        "device_id": device,
        "nonce": uuid.uuid4().hex,
        "firmware_version": {**CAPS, **EXTRA_CAPS}[hardware_id]["firmware_version"],
        "installed": installed,
    }
    answer = _post(client, f"/v1/devices/{device}/check-in", cred, body)
    return {b["model"]: b for b in answer["signed"]["bundles"]}


def _bins(values: np.ndarray, edges: list[float]) -> list[int]:
    return np.bincount(
        np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1
    ).tolist()


def _window(
    rng: np.random.Generator, device: str, version: str, sha: str, start: datetime, labelled: float
) -> dict[str, Any]:
    new = version == "2.0.0"
    n = int(rng.integers(40, 120))
    # The new version behaves a little differently, within every gate's threshold (so the
    # rollout holds on thin evidence rather than failing).
    predicted = rng.choice(2, size=n, p=[0.57, 0.43] if new else [0.6, 0.4])
    latency = sketch.new_sketch(0.01)
    for value in rng.lognormal(-5.98 if new else -6.0, 0.4, n):
        sketch.add(latency, float(value))
    labels: dict[str, dict[str, int]] = {}
    for p in predicted[rng.random(n) < labelled]:
        truth = p if rng.random() < 0.85 else 1 - p
        tally = labels.setdefault(CLASSES[p], {})
        tally[CLASSES[truth]] = tally.get(CLASSES[truth], 0) + 1
    return {
        "device_id": device,
        "model": MODEL,
        "version": version,
        "bundle_sha256": sha,
        "window_start": start.isoformat(),
        "window_s": 3600,
        "inference_count": n,
        "error_count": int(rng.binomial(n, 0.0105 if new else 0.01)),
        "selftest_failure_count": int(rng.random() < 0.003),
        "latency": latency,
        "outputs": [
            {"name": "label", "counts": [*np.bincount(predicted, minlength=2).tolist(), 0]}
        ],
        "inputs": [
            {"name": "x0", "counts": _bins(rng.normal(0.15 if new else 0.0, 1.0, n), EDGES["x0"])},
            {"name": "x1", "counts": _bins(rng.normal(0.5, 0.38, n), EDGES["x1"])},
        ],
        "feedback": {"thumbs_down": int(rng.binomial(n, 0.021 if new else 0.02))},
        "labels": labels,
    }


def seed(server: ServerProcess, client: httpx.Client, *, seed_value: int = 13) -> SeededFleet:
    """Fill ``server`` (started, SQLite in its data directory) with the fleet described above,
    through ``client`` (an HTTP client on the server's URL)."""
    rng = np.random.default_rng(seed_value)
    now = datetime.now(UTC)
    admin = server.admin_token
    tokens = {"admin": admin}
    for role in ("viewer", "operator"):
        tokens[role] = _post(client, "/v1/tokens", admin, {"name": f"{role}-1", "role": role}, 201)[
            "token"
        ]
    shas: dict[tuple[str, str], str] = {}
    hil_key = SigningKey.from_pem((server.data_dir / "keys" / "hil.pem").read_bytes())
    for version, counter in VERSIONS.items():
        for target in TARGETS:
            data = make_bundle(
                [server.release_key],
                target=target,
                version=version,
                counter=counter,
                name=MODEL,
                changes={"reference_histograms": REFERENCE},
                mlflow=MLFLOW.get(version),
            )
            published = _post(client, "/v1/bundles", admin, data, 201)
            shas[(version, target)] = published["sha256"]
            if version == "2.0.0":  # the rig passed it on both targets
                rig = report(published, hil_key, hardware_id=target)
                _post(client, f"/v1/bundles/{published['sha256']}/hil-report", admin, rig)
    _post(client, f"/v1/models/{MODEL}/versions/1.0.0/release", tokens["operator"], {})
    engine = make_engine(f"sqlite:///{(server.data_dir / 'fleet.db').resolve()}")
    creds = _enroll(engine, now)
    for i in range(9, 12):
        r = client.put(
            f"/v1/devices/ring-{i:02d}/pins/{MODEL}",
            json={"version": "1.1.0"},
            headers={"Authorization": f"Bearer {tokens['operator']}"},
        )
        assert r.status_code == 200, r.text
    plan = {
        "model": MODEL,
        "version": "2.0.0",
        "selector": {"hardware_ids": ["phone-android"]},
        "stages": [
            {"percent": 50, "min_duration_s": 0, "approval": True, "thin_deadline_s": 30 * 86400},
            {"percent": 100, "min_duration_s": 0},
        ],
        "gates": {"min_devices_per_arm": 10, "min_inferences_per_arm": 500},
        "on_failure": "halt",
    }
    rollout_id = _post(client, "/v1/rollouts", tokens["operator"], plan, 201)["id"]
    started = now - timedelta(days=ROLLOUT_DAYS_AGO)
    with Session(engine) as session:
        session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(started_at=started, stage_started_at=started)
        )
        session.commit()

    never_seen = {"phone-038", "phone-039", "rpi-2"}
    running: dict[str, str] = {}
    for device, cred in creds.items():
        if device in never_seen:
            continue
        offered = _check_in(client, device, cred, []).get(MODEL)
        if offered is None:
            continue
        outcome = "self-test-failed" if device in ("phone-004", "phone-017") else "ok"
        version = offered["version"] if outcome == "ok" else "1.0.0"
        if offered["version"] == "1.0.0" or outcome == "ok":
            running[device] = version
        installed = {
            "model": MODEL,
            "version": version,
            "bundle_sha256": shas[(version, _devices()[device][0])],
            "last_install": outcome,
        }
        _check_in(client, device, cred, [installed])
    _try_and_revert(client, REVERTED_RING, creds[REVERTED_RING], shas)
    # Some devices went quiet: their last check-in is days back.
    silent = {"phone-035": 3, "phone-036": 2, "ring-05": 4, "iphone-3": 10}
    with Session(engine) as session:
        for device, days in silent.items():
            session.execute(
                update(Device)
                .where(Device.id == device)  # type: ignore[arg-type]
                .values(last_seen=now - timedelta(days=days, hours=2))
            )
        session.commit()
    _spread_events(engine, now, started)
    engine.dispose()

    today = now.date()
    sequence = dict.fromkeys(running, 0)
    for day_index in range(DAYS):
        day = today - timedelta(days=DAYS - 1 - day_index)
        labelled = 0.4 * (DAYS - 1 - day_index) / (DAYS - 1)  # labels come late
        for device, arm_version in running.items():
            hardware_id = _devices()[device][0]
            windows = []
            for hour in HOURS:
                start = datetime(day.year, day.month, day.day, hour, tzinfo=UTC)
                if start > now - timedelta(hours=1):
                    continue
                version = (
                    arm_version if start >= started or hardware_id != "phone-android" else "1.0.0"
                )
                windows.append(
                    _window(rng, device, version, shas[(version, hardware_id)], start, labelled)
                )
            if not windows:
                continue
            if device in ("phone-010", "ring-02") and day_index == 2:
                sequence[device] += 1  # a batch lost on the way: completeness below 1
            batch = {
                "device_id": device,
                "boot_epoch": 1,
                "sequence": sequence[device],
                "windows": windows,
            }
            sequence[device] += 1
            _post(client, f"/v1/devices/{device}/telemetry", creds[device], batch)
        if day >= started.date():
            _post(client, f"/v1/rollouts/{rollout_id}/evaluate", tokens["operator"], {})
    return SeededFleet(server, client, tokens, rollout_id, today, creds)


def _try_and_revert(
    client: httpx.Client, device: str, cred: str, shas: dict[tuple[str, str], str]
) -> None:
    """``device`` (a ring on 1.0.0 in slot a) reports 1.1.0 active in slot b, then 1.0.0 active
    again with slot b failed: an install and a revert in its event log."""
    hardware_id = _devices()[device][0]
    steps = [
        ("1.1.0", "b", {"a": "standby", "b": "active"}, None),
        ("1.0.0", "a", {"a": "active", "b": "failed"}, "watchdog reset after activation"),
    ]
    for version, slot, slots, error in steps:
        entry = {
            "model": MODEL,
            "version": version,
            "bundle_sha256": shas[(version, hardware_id)],
            "active_slot": slot,
            "slots": slots,
            "last_install": "ok",
        }
        _check_in(client, device, cred, [{**entry, "last_error": error} if error else entry])


def _spread_events(engine: Any, now: datetime, started: datetime) -> None:
    """Move the seeded events from the moment of seeding to the days they stand for: first
    reports six days back, installs of 1.0.0 over the three days after, installs of 2.0.0 (and
    the failures) over the rollout's days, the ring's try of 1.1.0 two days back and its revert
    yesterday."""
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC)
    with Session(engine) as session:
        for event in session.exec(select(DeviceEvent)):
            index = int(event.device_id.rsplit("-", 1)[1])
            hour = timedelta(hours=8 + index % 9)
            if event.kind == "reported":
                at = midnight - timedelta(days=DAYS) + hour
            elif event.device_id == REVERTED_RING and event.version == "1.1.0":
                at = midnight - timedelta(days=2) + hour
            elif event.kind == "revert":
                at = midnight - timedelta(days=1) + hour
            elif event.version == "2.0.0" or event.outcome != "ok":
                at = started + timedelta(days=index % ROLLOUT_DAYS_AGO, hours=1 + index % 5)
            else:
                at = midnight - timedelta(days=DAYS - 1 - index % 3) + hour
            event.at = min(at, now - timedelta(minutes=5))
        session.commit()


@contextmanager
def seeded_server(directory: Path) -> Iterator[SeededFleet]:
    """``edgefleet serve --init`` on loopback with a SQLite file under ``directory``, seeded;
    the periodic evaluator held back so the decision log is what the seeding wrote."""
    server = ServerProcess(
        data_dir=directory / "data",
        log_dir=directory,
        serve_args=("--rollout-evaluation-s", "86400"),
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield seed(server, client)
    finally:
        server.stop()


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium, headless, in a fresh profile (Playwright makes one per launch)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )


@dataclass
class Visitor:
    """A logged-in browser context that records every request it makes and every console
    error; requests to anywhere but the server are aborted (and recorded)."""

    context: Any
    page: Any
    base: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(self.base + "/")]

    def goto(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        self.page.wait_for_load_state("load")
        return response

    def charts(self) -> dict[str, Any]:
        """What uPlot drew: per chart, its series labels and data."""
        return self.page.evaluate(
            """() => Object.fromEntries(Object.entries(window.edgefleetCharts || {}).map(
                 ([id, u]) => [id, {labels: u.series.map(s => s.label), data: u.data}]))"""
        )

    def close(self) -> None:
        self.context.close()


def visit(
    browser: Any, base: str, token: str, *, viewport: tuple[int, int] = (1280, 900)
) -> Visitor:
    """A new browser context logged in to the dashboard with ``token`` through the login form."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    visitor = Visitor(context, page, base)

    def route(r: Any) -> None:
        visitor.requests.append(r.request.url)
        if r.request.url.startswith(base + "/"):
            r.continue_()
        else:
            r.abort()

    context.route("**/*", route)
    page.on(
        "console", lambda m: visitor.console_errors.append(m.text) if m.type == "error" else None
    )
    page.on("pageerror", lambda e: visitor.console_errors.append(str(e)))
    page.goto(base + "/ui/login")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == base + "/ui/", page.url
    return visitor
