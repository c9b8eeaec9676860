"""Who contributed to whole days is remembered between requests (server/contributor_cache.py),
and never shown stale: a batch outside the span changes the span's completeness at the next
request, and erasing counts that are then refilled to the same sums still tells the cache."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event
from sqlmodel import Session

from server import batch_counts, contributor_cache, metrics
from server.models import TelemetryBatchCount
from tests.server.test_fleet_rollup import (  # noqa: F401 (``seeded`` is a fixture)
    DAYS,
    MODEL,
    Seeded,
    _fold_all,
    seeded,
)
from tests.server.test_metrics import DAY0, _same_figures, get, make_raw, window

WHOLE = {
    "from": DAY0.date().isoformat(),
    "to": (DAY0 + timedelta(days=DAYS - 1)).date().isoformat(),
}
PATH = f"/v1/models/{MODEL}/versions/1.0.0/metrics"


@pytest.fixture()
def contributor_queries(seeded: Seeded) -> Iterator[list[str]]:  # noqa: F811
    """The statements that count contributors from the devices' rollup rows, as they run."""
    found: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "GROUP BY telemetry_rollup.device_id" in statement:
            found.append(statement)

    engine = seeded.fleet.state.engine
    event.listen(engine, "before_cursor_execute", seen)
    yield found
    event.remove(engine, "before_cursor_execute", seen)


def test_a_remembered_span_is_answered_again_only_while_nothing_changed(
    seeded: Seeded,  # noqa: F811
    contributor_queries: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet, up = seeded.fleet, seeded.up
    first = get(fleet, PATH, **WHOLE)
    assert len(contributor_queries) == 1
    assert get(fleet, PATH, **WHOLE) == first
    assert len(contributor_queries) == 1  # remembered
    # A batch whose window lies after the span: the span's fleet rollups stay as they were, but
    # p-0's batch counts (all its uploads) grow, so the span's completeness changes.
    late = make_raw(np.random.default_rng(7), ["p-0"], DAYS + 2)[-1]
    up.send("p-0", [window(late, MODEL, "1.0.0", seeded.shas["phone-android"])])
    assert _fold_all(fleet) == 1
    after = get(fleet, PATH, **WHOLE)
    assert len(contributor_queries) == 2
    received = first["total"]["completeness"]["batches_received"]
    assert after["total"]["completeness"]["batches_received"] == received + 1
    monkeypatch.setattr(metrics, "USE_FLEET_ROLLUPS", False)
    _same_figures(get(fleet, PATH, **WHOLE), after)  # from the devices' rows, nothing remembered


def test_counts_erased_and_refilled_to_the_same_sums_still_change_the_check(
    seeded: Seeded,  # noqa: F811
) -> None:
    with Session(seeded.fleet.state.engine) as session:
        session.add(
            TelemetryBatchCount(
                device_id="gone", hardware_id="ring-gen3", boot_epoch=1, received=3, top_sequence=4
            )
        )
        session.commit()
        before = contributor_cache.batch_check(session)
        batch_counts.erase(session, "gone")
        session.add(
            TelemetryBatchCount(
                device_id="new", hardware_id="ring-gen3", boot_epoch=1, received=3, top_sequence=4
            )
        )
        session.commit()
        after = contributor_cache.batch_check(session)
    assert before[:3] == after[:3]  # rows and sums alone would not tell
    assert after != before
