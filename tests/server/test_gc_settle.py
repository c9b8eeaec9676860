"""A serving process freezes what it holds once its first seconds have passed, so the collector's
full collections under load scan only what requests leave behind (``server.app.create_app``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.server_cli import init_trust
from server import app as server_app
from server.app import build_state, create_app
from server.config import Settings
from server.db import upgrade


@pytest.fixture()
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's objects back in the collector's view


@pytest.mark.parametrize("serving", [True, False], ids=["serving-process", "embedded"])
def test_what_the_first_seconds_allocate_is_frozen_only_in_a_serving_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfrozen: None, serving: bool
) -> None:
    monkeypatch.setattr(server_app, "SETTLE_S", 0.3)
    data_dir = tmp_path / "data"
    init_trust(data_dir)
    url = f"sqlite:///{data_dir / 'fleet.db'}"
    upgrade(url)
    state = build_state(Settings(data_dir=data_dir, database_url=url))
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(state, freeze_when_settled=serving)) as client:
        assert client.get("/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline and serving:
            time.sleep(0.05)
        if not serving:
            time.sleep(1.0)  # three times the settling time
        frozen = gc.get_freeze_count()
    state.engine.dispose()
    if serving:
        # Everything the process held then: the app, its state, the modules.
        assert frozen > 10_000
    else:
        assert frozen == 0
