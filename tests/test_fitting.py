"""Per-target variant choice: limits, budget, smallest wins, reasons for every rejection."""

from __future__ import annotations

from dataclasses import replace

import pytest

from converters.fitting import VariantFacts, choose, quality_loss
from firmware_bundles import TargetCatalogue

CAT = TargetCatalogue.load_default()
MLP_OPS = ("Add", "MatMul", "Softmax")
FLOAT = VariantFacts("float32", "float32", "float32", 60_000, MLP_OPS, 30_000, 0.97, 1e-4)
FP16 = VariantFacts("fp16", "fp16", "float16", 31_000, (*MLP_OPS, "Cast"), 20_000, 0.97, 1e-4)
INT8 = VariantFacts(
    "int8-static",
    "int8-static",
    "int8",
    18_000,
    (*MLP_OPS, "DequantizeLinear", "QuantizeLinear"),
    12_000,
    0.965,
    2e-4,
)


def pick(target: str, variants: list[VariantFacts], budget: float = 0.01):  # type: ignore[no-untyped-def]
    return choose(
        CAT.get(target),
        variants,
        task="classification",
        float_metric=0.97,
        budget=budget,
        bundle_overhead_bytes=4096,
    )


def test_smallest_variant_inside_budget_wins() -> None:
    assert pick("phone-android", [FLOAT, FP16, INT8]).chosen == INT8


def test_fp16_is_not_offered_to_a_target_without_fp16() -> None:
    choice = pick("devboard-rpi4", [FLOAT, FP16])
    assert choice.chosen == FLOAT
    assert "precision float16 not supported" in choice.rejected["fp16"]


def test_variant_over_the_budget_is_rejected_with_its_loss() -> None:
    worse = replace(INT8, metric=0.95)
    choice = pick("phone-android", [FLOAT, worse])
    assert choice.chosen == FLOAT
    assert choice.rejected["int8-static"] == ["-2.0 points, over the budget"]


def test_nothing_fits_gives_a_reason_per_variant() -> None:
    trees = VariantFacts(
        "float32", "float32", "float32", 900_000, ("TreeEnsembleClassifier",), 400_000, 0.96
    )
    choice = pick("ring-gen3", [trees])
    assert not choice.ok
    reasons = choice.reason()
    assert "too big by" in reasons and "op TreeEnsembleClassifier not allowed" in reasons
    assert "over the arena" in reasons


def test_same_as_float_variant_is_never_chosen_as_quantised() -> None:
    fake = replace(INT8, model_bytes=59_000, same_as_float=True)
    choice = pick("phone-android", [FLOAT, fake])
    assert choice.chosen == FLOAT
    assert "same as float32" in choice.rejected["int8-static"][0]


def test_ties_broken_by_latency() -> None:
    slow = replace(INT8, name="int8-a", latency_s=5e-4)
    fast = replace(INT8, name="int8-b", latency_s=1e-4)
    assert pick("phone-android", [slow, fast]).chosen == fast


def test_regression_budget_is_relative_mae() -> None:
    assert quality_loss("regression", 2.0, 2.02) == pytest.approx(0.01)
    assert quality_loss("classification", 0.97, 0.96) > 0.0099


def test_close_timings_do_not_decide_a_tie_so_the_choice_reproduces() -> None:
    """Equal sizes and timings within noise: the more accurate, then the first name, wins."""
    a = replace(INT8, name="int8-a", latency_s=1.00e-4, metric=INT8.metric - 0.001)
    b = replace(INT8, name="int8-b", latency_s=1.04e-4)
    c = replace(INT8, name="int8-c", latency_s=0.97e-4)
    assert pick("phone-android", [a, b, c]).chosen == b
    assert pick("phone-android", [c, b, a]).chosen == b
