"""The shadow-agreement and data-quality gates on synthetic samples (pure, as the other gates)."""

from __future__ import annotations

from typing import Any

import pytest

from server import shadow_gates
from server.gates import DeviceSample, GateConfig, GateResult, Verdict
from tests.server.windows import shadow_counts


def sample(
    device: str,
    *,
    calls: int = 1000,
    compared: int = 0,
    agreed: int = 0,
    refused: int = 0,
    missing: int = 0,
) -> DeviceSample:
    agg: dict[str, Any] = {
        "inference_count": calls,
        "quality": {"missing": {"x0": missing}, "refused": {"input": refused}},
        "shadow": {"2.0.0": shadow_counts(compared, agreed)},
    }
    return DeviceSample(device, agg)


@pytest.mark.parametrize(
    ("agreed_per_device", "status"),
    [(50, "fail"), (99, "pass"), (90, "hold")],
    ids=["half-agree-fails", "nearly-all-agree-passes", "at-the-threshold-holds"],
)
def test_shadow_agreement_gate(agreed_per_device: int, status: str) -> None:
    treatment = [sample(f"d{i}", compared=100, agreed=agreed_per_device) for i in range(20)]
    config = GateConfig(shadow_agreement={"min_agreement": 0.9, "min_compared": 300})
    result = shadow_gates.shadow_agreement(treatment, "2.0.0", config, 0.01)
    assert result.status == status, result.reason
    assert result.estimate == pytest.approx(agreed_per_device / 100)
    assert result.lower is not None and result.upper is not None
    assert result.lower <= result.estimate <= result.upper
    assert result.treatment_inferences == 2000


def test_shadow_agreement_thin_data_holds_and_another_candidate_is_not_counted() -> None:
    config = GateConfig()
    thin = [sample("d0", compared=50, agreed=10)]
    result = shadow_gates.shadow_agreement(thin, "2.0.0", config, 0.01)
    assert result.status == "hold" and "thin data: 50 shadow comparisons" in result.reason
    other = shadow_gates.shadow_agreement(thin, "3.0.0", config, 0.01)
    assert other.treatment_devices == 0


@pytest.mark.parametrize(
    ("treatment_problems", "status"),
    [(200, "fail"), (10, "pass")],
    ids=["refused-calls-up-fails", "same-as-control-passes"],
)
def test_data_quality_gate(treatment_problems: int, status: str) -> None:
    treatment = [sample(f"t{i}", refused=treatment_problems) for i in range(20)]
    control = [sample(f"c{i}", refused=5, missing=5) for i in range(20)]
    config = GateConfig(data_quality={"enabled": True, "max_increase": 0.02})
    result = shadow_gates.data_quality(treatment, control, config, 0.01)
    assert result.status == status, result.reason
    assert result.control_value == pytest.approx(0.01)
    assert result.treatment_value == pytest.approx(treatment_problems / 1000)


def test_extra_results_fail_or_hold_a_verdict_by_the_same_rule() -> None:
    passed = Verdict("advance-ok", "every gate passed", (), ())
    fail = GateResult("shadow_agreement", "fail", "shadow_agreement: low", 0.9, 0.01)
    hold = GateResult("data_quality", "hold", "not yet conclusive", 0.01, 0.01)
    assert shadow_gates.with_results(passed, [fail]).decision == "fail"
    held = shadow_gates.with_results(passed, [hold])
    assert held.decision == "hold" and "data_quality: not yet conclusive" in held.reason
    assert shadow_gates.with_results(passed, []) is passed
    # Off unless asked for: a normal rollout judges neither extra gate by default.
    assert shadow_gates.judge_extra([], [], GateConfig(), shadow_candidate=None) == []
