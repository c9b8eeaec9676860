"""Appended windows and the fold job: a window counts exactly once whether it waits or is folded,
folding again or two folders at once count nothing twice, a replayed batch is a no-op either side
of the fold, and retention drops whole days (PostgreSQL: their partitions) once folded."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlmodel import Session, func, select

from server import fleet_rollup, fold, telemetry
from server.models import (
    FleetRollup,
    TelemetryBatchCount,
    TelemetryRollup,
    TelemetryWindowRecord,
)
from tests.server.conftest import Fleet, running_fleet
from tests.server.test_metrics import (
    DAY0,
    Raw,
    Uploader,
    _same_figures,
    _uploads_in_order,
    make_raw,
    metrics,
    publish,
    window,
)

#: Whole days and a cut one (from 06:00 on the second day): both read paths of the metrics API.
SPANS = [
    {"from": DAY0.date().isoformat(), "to": (DAY0 + timedelta(days=2)).date().isoformat()},
    {"from": (DAY0 + timedelta(days=1, hours=6)).isoformat(), "to": "2026-03-05"},
]


def _fold(fleet: Fleet, limit: int = 10_000) -> int:
    with Session(fleet.state.engine) as session:
        return fold.fold(session, relative_accuracy=0.01, limit=limit).windows


def _count(fleet: Fleet, *where: Any) -> int:
    with Session(fleet.state.engine) as session:
        query = select(func.count()).select_from(TelemetryWindowRecord).where(*where)
        return int(session.exec(query).one())


def _unfolded(fleet: Fleet) -> int:
    return _count(fleet, ~TelemetryWindowRecord.folded)  # type: ignore[operator]


def _figures(fleet: Fleet, name: str) -> list[Any]:
    return [metrics(fleet, name, "1.0.0", **span) for span in SPANS]


def _upload(fleet: Fleet, name: str, devices: int = 4, days: int = 3) -> tuple[Uploader, list[Raw]]:
    bundle_sha256 = publish(fleet, name, "1.0.0")
    raws = make_raw(np.random.default_rng(5), [f"{name}-{i}" for i in range(devices)], days)
    up = Uploader(fleet)
    for device, rs in _uploads_in_order(raws):
        up.send(device, [window(r, name, "1.0.0", bundle_sha256) for r in rs])
    return up, raws


def test_a_window_counts_once_waiting_partly_folded_and_folded(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    _, raws = _upload(fleet, "wait")
    assert _unfolded(fleet) == len(raws)
    waiting = _figures(fleet, "wait")
    # SPANS[0] is three whole days ("to" a date takes that day in): every window.
    assert waiting[0]["total"]["inferences"] == sum(len(r.x0) for r in raws)
    assert waiting[0]["total"]["windows"] == len(raws)
    rollups = fleet.client.get(
        "/v1/telemetry/rollups?model=wait", headers=fleet.auth(fleet.token("viewer"))
    ).json()
    assert sum(r["window_count"] for r in rollups) == len(raws)
    assert _fold(fleet, limit=len(raws) // 3) == len(raws) // 3
    for before, after in zip(waiting, _figures(fleet, "wait"), strict=True):
        _same_figures(before, after)
    assert _fold(fleet) == len(raws) - len(raws) // 3
    assert _unfolded(fleet) == 0
    for before, after in zip(waiting, _figures(fleet, "wait"), strict=True):
        _same_figures(before, after)
    again = fleet.client.get(
        "/v1/telemetry/rollups?model=wait", headers=fleet.auth(fleet.token("viewer"))
    ).json()
    assert [r["inference_count"] for r in again] == [r["inference_count"] for r in rollups]


def test_folding_again_or_two_folders_at_once_count_nothing_twice(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    _, raws = _upload(fleet, "race", devices=6)
    waiting = _figures(fleet, "race")
    folded: list[int] = []
    errors: list[BaseException] = []

    def folder() -> None:
        try:
            while (done := _fold(fleet, limit=7)) > 0:
                folded.append(done)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=folder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(folded) == len(raws)
    assert _fold(fleet) == 0  # folding again finds nothing
    with Session(fleet.state.engine) as session:
        in_rollups = session.exec(select(func.sum(TelemetryRollup.window_count))).one()
    assert in_rollups == len(raws)
    for before, after in zip(waiting, _figures(fleet, "race"), strict=True):
        _same_figures(before, after)


def test_a_replayed_batch_is_a_no_op_before_and_after_folding(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    up, raws = _upload(fleet, "again", devices=2)
    device = "again-0"
    bundle_sha256 = publish(fleet, "again", "1.0.1", counter=2)
    windows = [window(r, "again", "1.0.1", bundle_sha256) for r in raws if r.device == device]
    sequence = up.send(device, windows)
    first = metrics(fleet, "again", "1.0.1", **SPANS[0])
    stored = _count(fleet)
    counted = _batch_counts(fleet, device)
    assert counted == [(1, sequence + 1, sequence)]  # kept at ingest, before any fold
    for fold_first in (False, True):
        if fold_first:
            assert _fold(fleet) == stored
        body = {"device_id": device, "boot_epoch": 1, "sequence": sequence, "windows": windows}
        r = fleet.client.post(
            f"/v1/devices/{device}/telemetry",
            json=body,
            headers=fleet.auth(up.creds[device]),
        )
        assert r.status_code == 200 and r.json()["replay"] is True, r.text
        assert _count(fleet) == stored
        assert _batch_counts(fleet, device) == counted  # a replay counts no batch
        _same_figures(first, metrics(fleet, "again", "1.0.1", **SPANS[0]))


def _batch_counts(fleet: Fleet, device: str) -> list[tuple[int, int, int]]:
    with Session(fleet.state.engine) as session:
        rows = session.exec(
            select(TelemetryBatchCount).where(TelemetryBatchCount.device_id == device)
        ).all()
        return [(r.boot_epoch, r.received, r.top_sequence) for r in rows]


def _partitions(fleet: Fleet) -> list[str]:
    with fleet.state.engine.connect() as conn:
        return sorted(
            conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'telemetry_window'::regclass"
                )
            ).scalars()
        )


def test_retention_drops_folded_days_and_their_partitions(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    postgresql = fleet.state.engine.dialect.name == "postgresql"
    up, raws = _upload(fleet, "old", days=3)
    days = [(DAY0 + timedelta(days=d)).strftime("%Y%m%d") for d in range(3)]
    if postgresql:
        assert _partitions(fleet) == [f"telemetry_window_p{d}" for d in days]
    before = _figures(fleet, "old")
    retention = fleet.state.settings.telemetry_retention_days
    now = DAY0 + timedelta(days=retention + 1, hours=1)  # the first day is past retention

    def drop() -> int:
        with Session(fleet.state.engine) as session:
            return telemetry.drop_expired_windows(session, now=now, retention_days=retention)

    assert drop() == 0  # its windows wait to be folded: nothing goes
    assert _count(fleet) == len(raws)
    _fold(fleet)
    first_day = sum(1 for r in raws if r.start < DAY0 + timedelta(days=1))
    assert drop() == first_day > 0
    assert _count(fleet) == len(raws) - first_day
    if postgresql:
        assert _partitions(fleet) == [f"telemetry_window_p{d}" for d in days[1:]]
    _same_figures(before[0], _figures(fleet, "old")[0])  # whole days come from the rollups
    # A late window for the dropped day is taken (its partition made again) and counted.
    late = make_raw(np.random.default_rng(9), ["old-0"], 1)[0]
    bundle_sha256 = publish(fleet, "old", "1.0.1", counter=2)
    up.send("old-0", [window(late, "old", "1.0.1", bundle_sha256)])
    got = metrics(fleet, "old", "1.0.1", **SPANS[0])
    assert got["total"]["inferences"] == len(late.predicted)
    if postgresql:
        assert f"telemetry_window_p{days[0]}" in _partitions(fleet)
    assert late.start < datetime(2026, 3, 3, tzinfo=UTC)


def test_a_folder_making_a_rollup_another_has_just_made_adds_into_it(
    pg_database_url: str, tmp_path: Path
) -> None:
    # One device's windows of one day: one rollup key, new to both folders. The first makes the
    # rows and holds its transaction open; the second, folding the other windows, reads no row,
    # goes to insert it and must wait, then add into the first's row (no unique violation, no
    # start again), leaving one rollup and one fleet rollup holding every window once.
    with running_fleet(pg_database_url, tmp_path, telemetry_fold_s=3600.0) as fleet:
        _, raws = _upload(fleet, "same", devices=1, days=1)
        assert len(raws) == 3
        engine = fleet.state.engine
        second: dict[str, Any] = {}

        def fold_the_rest() -> None:
            try:
                with Session(engine) as session:
                    second["done"] = fold.fold(session, relative_accuracy=0.01, limit=10)
            except BaseException as exc:  # reported by the test thread
                second["error"] = exc

        with Session(engine) as first:
            parts, hardware = fold.add_up(fold._claim(first, 1), 0.01)
            changes = fold.write_rollups(first, parts, hardware, 0.01)
            assert [c.was for c in changes] == ["new"]
            fleet_rollup.add_changes(first, changes, 0.01)
            thread = threading.Thread(target=fold_the_rest)
            thread.start()
            _wait_for_a_lock_wait(engine)
            first.commit()
        thread.join(timeout=60)
        assert "error" not in second, second
        assert second["done"].windows == 2
        with Session(engine) as session:
            rollups = session.exec(select(TelemetryRollup)).all()
            fleet_rows = session.exec(select(FleetRollup)).all()
        assert [(r.window_count, r.inference_count) for r in rollups] == [
            (3, sum(len(r.x0) for r in raws))
        ]
        assert [(f.window_count, f.device_count) for f in fleet_rows] == [(3, 1)]


def _wait_for_a_lock_wait(engine: Any) -> None:
    """Until a session of this database waits on a lock another holds."""
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            if waiting:
                return
            conn.rollback()
            time.sleep(0.05)
    raise AssertionError("the second folder never waited on the first")


def test_the_job_widens_to_every_folder_only_behind_a_backlog(
    unfolded_fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One folder keeps up with a steady stream; a round that comes back full means more wait,
    and the rounds after it use every folder (on PostgreSQL; SQLite folds with one)."""
    fleet = unfolded_fleet
    widths: list[int] = []
    real_round = fold.fold_round

    def recorded(session: Session, *, relative_accuracy: float, limit: int, folders: int) -> int:
        widths.append(folders)
        return real_round(
            session, relative_accuracy=relative_accuracy, limit=limit, folders=folders
        )

    monkeypatch.setattr(fold, "fold_round", recorded)
    _, few = _upload(fleet, "steady", devices=1, days=1)
    limit = len(few) + 1
    with Session(fleet.state.engine) as session:
        assert fold.fold_due(session, relative_accuracy=0.01, limit=limit, lease_s=60, folders=2)
    assert widths == [1]  # fewer than a round waited: one folder, once
    widths.clear()
    _, many = _upload(fleet, "backlog", devices=6)
    with Session(fleet.state.engine) as session:
        done = fold.fold_due(session, relative_accuracy=0.01, limit=limit, lease_s=60, folders=2)
    assert done == len(many) > 3 * limit
    wide = 2 if fleet.state.engine.dialect.name == "postgresql" else 1
    assert widths[0] == 1 and len(widths) > 1
    assert set(widths[1:]) == {wide}
    assert _unfolded(fleet) == 0


def test_the_job_folding_two_at_once_counts_each_window_once(unfolded_fleet: Fleet) -> None:
    # Small folds, two at once on PostgreSQL (one on SQLite), round after round until none wait.
    fleet = unfolded_fleet
    _, raws = _upload(fleet, "pair", devices=6)
    waiting = _figures(fleet, "pair")
    with Session(fleet.state.engine) as session:
        done = fold.fold_due(session, relative_accuracy=0.01, limit=5, lease_s=60, folders=2)
    assert done == len(raws)
    assert _unfolded(fleet) == 0
    with Session(fleet.state.engine) as session:
        in_rollups = session.exec(select(func.sum(TelemetryRollup.window_count))).one()
        in_fleet = session.exec(select(func.sum(FleetRollup.window_count))).one()
    assert in_rollups == in_fleet == len(raws)
    for before, after in zip(waiting, _figures(fleet, "pair"), strict=True):
        _same_figures(before, after)
