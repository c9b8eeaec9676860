"""The outbox: durable across restarts with the same idempotency keys, bounded on disk with what
is dropped counted, and uploaded to the real fleet server app (SQLite and PostgreSQL) whose
rollups must equal what the device recorded; replays are no-ops."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from device_agent.client import FleetClient
from device_agent.errors import AuthError, ServerUnreachable
from device_agent.outbox import BOOT_EPOCH_BASE_S, Outbox
from device_agent.runtime import LoadedModel, ModelRuntime
from device_agent.telemetry import Recorder
from device_agent.telemetry_upload import upload_pending
from firmware_bundles import build
from firmware_bundles import telemetry as sketch
from firmware_bundles.manifest import Manifest
from firmware_bundles.messages import TelemetryBatch
from tests.agent import onnx_models as m
from tests.agent.recording import DEVICE, HOUR, T0, Clock, record_burst, rollups, windows
from tests.server import conftest as server_conftest
from tests.server.conftest import Fleet

# The fleet server of tests/server (in process, real SQLite or PostgreSQL database), under the
# name ``server`` here; pytest registers a fixture by the name it is bound to in the module.
server = server_conftest.fleet
database_url = server_conftest.database_url
postgres_available = server_conftest.postgres_available


def _client(fleet: Fleet, tmp_path: Path) -> FleetClient:
    """The agent's fleet client on the in-process server."""
    return FleetClient(fleet.client, "http://testserver", tmp_path, 5)


def published(fleet: Fleet, manifest: Manifest | None = None) -> LoadedModel:
    """The classifier, published on ``fleet`` and loaded under its bundle's SHA-256 (the server
    checks each window against the manifest of the bundle it names)."""
    manifest = manifest or m.classifier_manifest()
    draft = {k: v for k, v in manifest.to_dict().items() if k != "files"}
    bundle = build(draft, {"model.onnx": m.classifier()}, [fleet.release_key])
    return ModelRuntime().load(fleet.publish(bundle)["sha256"], manifest, m.classifier())


def test_the_outbox_survives_a_restart_with_the_same_idempotency_keys(
    tmp_path: Path, classifier: LoadedModel
) -> None:
    path = tmp_path / "outbox.sqlite"
    base = BOOT_EPOCH_BASE_S
    first = Outbox(path, 1 << 20, wall_clock=lambda: base + 1000.0)
    clock = Clock()
    recorder = Recorder(first, DEVICE, clock=clock)
    for _ in range(5):
        recorder.run(classifier, np.zeros((1, 4), np.float32))
    recorder.close_due_windows(T0 + HOUR)
    sent = first.next_batch_bytes(10)
    assert sent is not None
    clock.now = T0 + HOUR + 5
    for _ in range(3):  # into an open window, flushed at close
        recorder.run(classifier, np.zeros((1, 4), np.float32))
    recorder.close()
    first.close()

    second = Outbox(path, 1 << 20, wall_clock=lambda: base + 900.0)  # the clock set back
    assert second.boot_epoch == 1001
    assert second.next_batch_bytes(10) == sent  # the same key and windows, byte for byte
    batch = TelemetryBatch.from_bytes(sent)
    assert batch.idempotency_key == (DEVICE, 1000, 0)
    second.acknowledge(batch)
    assert second.next_batch(10) is None  # the open window is not sent
    again = Recorder(second, DEVICE, clock=Clock(T0 + HOUR + 9))
    again.run(classifier, np.zeros((1, 4), np.float32))
    again.close_due_windows(T0 + 2 * HOUR)
    following = second.next_batch(10)
    assert following is not None
    assert following.idempotency_key == (DEVICE, 1001, 0)  # new epoch, sequence from 0
    assert [w.inference_count for w in following.windows] == [4]  # continued after restart
    second.close()
    lost = Outbox(tmp_path / "new.sqlite", 1 << 20, wall_clock=lambda: base + 5000.0)
    assert lost.boot_epoch == 5000  # a lost database still gets an epoch never used before
    lost.close()
    ahead = Outbox(tmp_path / "ahead.sqlite", 1 << 20, wall_clock=lambda: 1e12)
    assert ahead.boot_epoch < 2**31  # fits the server's 32-bit column
    ahead.close()


def test_an_unreadable_outbox_is_set_aside_and_telemetry_goes_on(
    tmp_path: Path, classifier: LoadedModel
) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"not a database, as bad flash leaves it " * 200)
    outbox = Outbox(path, 1 << 20)
    assert outbox.set_aside is not None
    assert outbox.set_aside.read_bytes().startswith(b"not a database")
    assert outbox.stats()["set_aside"] == str(outbox.set_aside)
    recorder = Recorder(outbox, DEVICE, clock=Clock())
    recorder.run(classifier, np.zeros((1, 4), np.float32))
    recorder.close_due_windows(include_open=True)
    batch = outbox.next_batch(10)
    assert batch is not None and [w.inference_count for w in batch.windows] == [1]
    outbox.close()
    reopened = Outbox(path, 1 << 20)
    assert reopened.set_aside is None  # the new file is fine
    reopened.close()


def test_a_full_outbox_drops_the_oldest_closed_windows_and_reports_them(
    tmp_path: Path, classifier: LoadedModel
) -> None:
    path = tmp_path / "outbox.sqlite"
    probe = Outbox(tmp_path / "probe.sqlite", 1 << 20)
    recorder = Recorder(probe, DEVICE, clock=Clock())
    recorder.run(classifier, np.zeros((1, 4), np.float32))
    recorder.close_due_windows(include_open=True)
    window_bytes = probe.stats()["bytes"]
    probe.close()

    limit = window_bytes * 10 + window_bytes // 2  # room for ten windows
    outbox = Outbox(path, limit)
    clock = Clock()
    recorder = Recorder(outbox, DEVICE, clock=clock)
    for hour in range(25):
        clock.now = T0 + hour * HOUR
        recorder.run(classifier, np.zeros((1, 4), np.float32))
        recorder.close_due_windows(clock.now + HOUR)
    stats = outbox.stats()
    # Room for about ten: a window's size varies by a few bytes with the latencies measured.
    kept = stats["closed_windows"]
    assert 9 <= kept <= 11, kept
    assert stats["dropped_windows"] == 25 - kept == stats["dropped_unreported"]
    assert stats["bytes"] <= limit
    batch = outbox.next_batch(50)
    assert batch is not None
    assert batch.dropped_windows == 25 - kept
    starts = [int(w.window_start.timestamp() - T0) // HOUR for w in batch.windows]
    assert starts == list(range(25 - kept, 25))  # the newest were kept
    outbox.acknowledge(batch)
    clock.now = T0 + 30 * HOUR
    recorder.run(classifier, np.zeros((1, 4), np.float32))
    recorder.close_due_windows(include_open=True)
    following = outbox.next_batch(50)
    assert following is not None and following.dropped_windows == 0
    assert outbox.stats()["dropped_windows"] == 25 - kept
    outbox.close()
    # Bounded by the byte budget plus SQLite's fixed pages (a few per table and index, the
    # versions table included): 25 windows written, the file did not grow to hold them.
    assert path.stat().st_size < limit + 80 * 1024


def test_upload_to_the_real_server_gives_rollups_equal_to_the_recorded_totals(
    server: Fleet, outbox: Outbox, tmp_path: Path
) -> None:
    fleet = server
    classifier, credential = published(fleet), fleet.enroll(DEVICE)
    clock = Clock(T0 + 60)
    recorder = Recorder(outbox, DEVICE, window_s=HOUR, flush_every=32, clock=clock)
    expected = record_burst(recorder, classifier, 150)
    clock.now = T0 + HOUR + 60  # same day, next hour
    second = record_burst(recorder, classifier, 70)
    recorder.close_due_windows(include_open=True)
    sent_windows = windows(outbox)
    assert len(sent_windows) == 2

    # The server is away: nothing is lost, the batch waits.
    with httpx.Client(timeout=2) as offline, pytest.raises(ServerUnreachable):
        upload_pending(
            outbox, FleetClient(offline, "http://127.0.0.1:9", tmp_path, 2), DEVICE, credential
        )
    assert outbox.stats()["pending_batches"] == 1
    with pytest.raises(AuthError):
        upload_pending(outbox, _client(fleet, tmp_path), DEVICE, "efd_wrong")
    pending = outbox.next_batch_bytes(50)

    result = upload_pending(outbox, _client(fleet, tmp_path), DEVICE, credential, batch_windows=1)
    assert (result.batches_sent, result.windows_sent, result.replays) == (1, 2, 0)
    assert result.pending_batches == 0
    [rollup] = rollups(fleet, "gesture")
    assert rollup["inference_count"] == expected["inference_count"] + second["inference_count"]
    assert rollup["error_count"] == 4
    assert rollup["window_count"] == 2
    assert rollup["outputs"]["probabilities"] == [
        a + b
        for a, b in zip(
            expected["outputs"]["probabilities"], second["outputs"]["probabilities"], strict=True
        )
    ]
    assert rollup["feedback"] == {"thumbs_up": 2}
    merged_latency = sketch.new_sketch()
    merged_inputs: dict[str, list[int]] = {}
    for w in sent_windows:
        sketch.merge(merged_latency, w.to_dict()["latency"])
        sketch.merge_named_counts(merged_inputs, ((h.name, h.counts) for h in w.inputs))
    assert rollup["latency"]["bins"] == merged_latency["bins"]
    assert rollup["latency"]["count"] == 220
    assert rollup["inputs"] == merged_inputs
    assert all(sum(c) == 220 for c in rollup["inputs"].values())

    # The same batch again (its answer lost on the way back): a no-op on the server.
    assert pending is not None
    replay = fleet.client.post(
        f"/v1/devices/{DEVICE}/telemetry", content=pending, headers=fleet.auth(credential)
    )
    assert replay.status_code == 200 and replay.json()["replay"] is True
    assert rollups(fleet, "gesture") == [rollup]
    outbox.close()


def test_a_retry_after_a_lost_answer_resends_the_same_key_and_is_a_no_op(
    server: Fleet, outbox: Outbox, tmp_path: Path
) -> None:
    fleet = server
    classifier, credential = published(fleet), fleet.enroll(DEVICE)
    recorder = Recorder(outbox, DEVICE, clock=Clock(T0))
    record_burst(recorder, classifier, 40)
    recorder.close_due_windows(include_open=True)
    body = outbox.next_batch_bytes(50)
    assert body is not None
    first = fleet.client.post(
        f"/v1/devices/{DEVICE}/telemetry", content=body, headers=fleet.auth(credential)
    )
    assert first.json() == {"accepted": True, "replay": False, "windows": 1}
    before = rollups(fleet, "gesture")
    outbox.close()  # the device restarts before it hears the answer

    reopened = Outbox(tmp_path / "outbox.sqlite", 1 << 20)
    result = upload_pending(reopened, _client(fleet, tmp_path), DEVICE, credential)
    assert (result.batches_sent, result.replays) == (1, 1)
    assert rollups(fleet, "gesture") == before
    assert before[0]["inference_count"] == 42
    assert reopened.stats()["pending_batches"] == 0
    reopened.close()


def test_a_batch_the_server_refuses_is_dropped_and_counted(server: Fleet, tmp_path: Path) -> None:
    fleet = server
    classifier = published(fleet)
    credential = fleet.enroll(DEVICE)
    outbox = Outbox(tmp_path / "outbox.sqlite", 1 << 20)
    recorder = Recorder(outbox, DEVICE, clock=Clock(T0))
    record_burst(recorder, classifier, 10)
    recorder.close_due_windows(include_open=True)
    upload_pending(outbox, _client(fleet, tmp_path), DEVICE, credential)
    # A device that takes the published bundle for one with four classes: its manifest has three.
    four = m.classifier_manifest(
        outputs=[
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, 3],
                "class_labels": [*m.CLASSES, "jump"],
            }
        ],
        output_histograms=[m.categorical("probabilities", [*m.CLASSES, "jump"])],
    )
    other = ModelRuntime().load(classifier.identity.bundle_sha256, four, m.classifier())
    confused = Recorder(outbox, DEVICE, clock=Clock(T0))  # a fresh tape: four classes counted
    confused.run(other, np.zeros((1, 4), np.float32))
    confused.close_due_windows(include_open=True)
    result = upload_pending(outbox, _client(fleet, tmp_path), DEVICE, credential)
    # Refused, dropped, and the drop reported at once in a batch of no windows.
    assert (result.batches_sent, result.windows_sent, result.rejected_batches) == (1, 0, 1)
    stats = outbox.stats()
    assert stats["dropped_windows"] == 1 and stats["dropped_unreported"] == 0
    assert stats["rejected_batches"] == 1
    assert "422" in stats["last_rejection"] and "has 5 counts" in stats["last_rejection"]
    r = fleet.client.get(f"/v1/devices/{DEVICE}", headers=fleet.auth(fleet.token("viewer")))
    assert r.json()["telemetry"]["windows_dropped_on_device"] == 1
    assert r.json()["telemetry"]["batches_received"] == 2  # sequence 1 was refused: a gap
    assert r.json()["telemetry"]["batches_expected"] == 3
    [rollup] = rollups(fleet, "gesture")
    assert rollup["inference_count"] == 12  # the refused window is not in it
    outbox.close()


def test_relayed_batches_keep_the_rings_keys_and_their_drops_make_no_batch_of_ours(
    tmp_path: Path, classifier: LoadedModel
) -> None:
    scratch = Outbox(tmp_path / "ring-side.sqlite", 1 << 20)
    recorder = Recorder(scratch, "ring-1", clock=Clock())
    record_burst(recorder, classifier, 5)
    recorder.close_due_windows(include_open=True)
    [window] = windows(scratch, "ring-1")
    scratch.close()
    pieces = [
        TelemetryBatch(device_id="ring-1", boot_epoch=3, sequence=s, windows=[window])
        for s in range(5)
    ]
    size = len(pieces[0].to_bytes())
    # Room for two pieces; the phone's own boot epoch is far above the ring's 3.
    outbox = Outbox(tmp_path / "phone.sqlite", 2 * size + size // 2)
    for piece in pieces:
        outbox.put_relayed(piece)
    outbox.put_relayed(pieces[4])  # the ring read twice: replaced, not stored twice
    stats = outbox.stats()
    assert (stats["pending_batches"], stats["bytes"]) == (2, 2 * size)
    assert stats["dropped_windows"] == 3  # the oldest stored went first
    assert stats["dropped_unreported"] == 0  # the server sees the ring's gap itself
    sent = []
    while (body := outbox.next_batch_bytes(50, "ring-1")) is not None:
        batch = TelemetryBatch.from_bytes(body)
        sent.append(batch.idempotency_key)
        outbox.acknowledge(batch)
    # Only what the ring made, under its keys: no batch of the phone's epoch under its id.
    assert sent == [("ring-1", 3, 3), ("ring-1", 3, 4)]
    assert outbox.relayed_devices() == ["ring-1"]
    outbox.close()
