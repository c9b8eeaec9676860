"""A window as an aggregate: what the ingest path builds field by field is what the formats'
own serialisation gives."""

from __future__ import annotations

import random

import pytest

from firmware_bundles import telemetry as sketch
from firmware_bundles.messages import LatencySketch
from server.aggregate import sketch_of


@pytest.mark.parametrize("seed", range(5))
def test_a_sketch_as_an_aggregate_is_its_model_dump(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        raw = sketch.new_sketch(rng.choice([0.01, 0.02, 0.05]))
        for _ in range(rng.randint(0, 20)):
            sketch.add(raw, rng.choice([0.0, rng.uniform(1e-6, 30.0)]), rng.randint(1, 5))
        latency = LatencySketch.model_validate(raw)
        assert sketch_of(latency) == latency.model_dump()
