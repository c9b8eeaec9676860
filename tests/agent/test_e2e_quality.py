"""Data-quality counters end to end through real processes: a stream of predictions with 3% NaN
and 5% out-of-range values in one feature, and a few calls of the wrong shape, counted by the
agent and shown exactly by the server's metrics and drift APIs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_agent.local_api import LocalApiClient, LocalApiError, socket_path
from tests.agent.e2e_bundles import FEATURES, MODEL
from tests.agent.test_e2e import agent_on_v1
from tests.procs import wait_for

CALLS = 1000
#: The e2e bundles' reference edges for every feature are [-0.5, 0, 0.5]: the training range.
INSIDE = 0.45
FEATURE = 3
MISSING = 30  # 3%
OUT_OF_RANGE = 50  # 5%, half below and half above the range
REFUSED = 7


def stream() -> np.ndarray:
    """``CALLS`` rows inside the training range, then the problems put into one feature."""
    rng = np.random.default_rng(5)
    rows = rng.uniform(-INSIDE, INSIDE, (CALLS, 1, FEATURES)).astype(np.float32)
    picked = rng.permutation(CALLS)
    rows[picked[:MISSING], 0, FEATURE] = np.nan
    out = picked[MISSING : MISSING + OUT_OF_RANGE]
    rows[out, 0, FEATURE] = np.where(np.arange(OUT_OF_RANGE) % 2 == 0, -3.0, 0.5)  # 0.5: the top
    return rows


def test_nan_and_out_of_range_values_are_counted_exactly_on_the_server(tmp_path: Path) -> None:
    with agent_on_v1(tmp_path) as (server, agent, _, _v1):
        client = LocalApiClient(socket_path(agent.state_dir))
        for row in stream():
            client.predict(MODEL, row)
        for _ in range(REFUSED):  # wrong feature count: refused by the schema check
            try:
                client.predict(MODEL, np.zeros((1, FEATURES - 1), np.float32))
            except LocalApiError as exc:
                assert exc.type == "InputError"
            else:
                raise AssertionError("a row of the wrong width was answered")
        path = f"/v1/models/{MODEL}/versions/1.0.0"

        def quality() -> dict[str, Any] | None:
            total = server.api("GET", f"{path}/metrics", params={"by": "none"})["total"]
            done = total["inferences"] == CALLS + REFUSED
            return total if done and total["data_quality"]["refused_total"] == REFUSED else None

        total = wait_for(quality, f"{CALLS + REFUSED} calls on the server")
        features = {f["name"]: f for f in total["data_quality"]["features"]}
        f = features[f"f{FEATURE}"]
        assert (f["values"], f["missing"], f["out_of_range"]) == (CALLS, MISSING, OUT_OF_RANGE)
        assert f["missing_rate"] == MISSING / CALLS == 0.03
        assert f["out_of_range_rate"] == OUT_OF_RANGE / CALLS == 0.05
        others = [g for name, g in features.items() if name != f"f{FEATURE}"]
        assert len(others) == FEATURES - 1
        assert all((g["missing"], g["out_of_range"], g["values"]) == (0, 0, CALLS) for g in others)
        assert total["data_quality"]["refused"] == {"input": REFUSED}
        assert total["errors"] == REFUSED

        drift = server.api("GET", f"{path}/drift")["drift"]
        rows = {r["name"]: r for r in drift["inputs"]}
        counted = rows[f"f{FEATURE}"]
        assert counted["data_quality"]["missing"] == MISSING
        assert counted["data_quality"]["out_of_range"] == OUT_OF_RANGE
        # NaN is in no bin: the histogram holds the other values, the range's edges the rest.
        assert sum(counted["counts"]) == CALLS - MISSING
        assert counted["counts"][0] + counted["counts"][-1] == OUT_OF_RANGE
        shown = server.cli("metrics", MODEL, "1.0.0")
        assert shown.returncode == 0, shown.stderr
        assert "data quality" in shown.stdout and "50 (5.00%)" in shown.stdout
        assert f"{REFUSED} calls naming input" in shown.stdout
        print(
            f"\ndata quality e2e: f{FEATURE} values {f['values']} missing {f['missing']}"
            f" ({f['missing_rate']:.3f}) out of range {f['out_of_range']}"
            f" ({f['out_of_range_rate']:.3f}); refused {total['data_quality']['refused']}"
        )
