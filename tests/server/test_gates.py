"""The rollout gates on synthetic fleets: A/A never fails, each regression fails its own gate,
thin data holds, three treatment devices never fail, SRM is seen, sample order does not matter."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from firmware_bundles import telemetry
from server import gates
from server.gate_config import MIN_DEVICES_FLOOR, AccuracyGate
from server.gates import DeviceSample, GateConfig, GateInputError, judge

CLASSES = ["a", "b", "c", "d"]
OUTPUT = np.array([0.4, 0.3, 0.2, 0.1])
INPUT = np.array([0.05, 0.15, 0.3, 0.3, 0.15, 0.05])


def _sketch(rng: np.random.Generator, n: int, scale: float) -> dict[str, Any]:
    sketch = telemetry.new_sketch()
    values = scale * rng.lognormal(0.0, 0.35, n)
    # One add per distinct bucket: the sketch only keeps bucket counts.
    keys, counts = np.unique(np.ceil(np.log(values) / math.log(1.01 / 0.99)), return_counts=True)
    for key, count in zip(keys, counts, strict=True):
        telemetry.add(sketch, (1.01 / 0.99) ** (key - 0.5), int(count))
    return sketch


def _device(rng: np.random.Generator) -> dict[str, Any]:
    """A device's own traits, the same before and during the rollout."""
    return {
        "inferences": rng.gamma(2.0, 300.0),
        "error": rng.beta(0.5, 49.5),
        "latency": 0.05 * math.exp(rng.normal(0, 0.25)),
        "output": rng.dirichlet(100 * OUTPUT),
        "input": rng.dirichlet(200 * INPUT),
        "accuracy": rng.beta(45, 5),
        "negative": rng.beta(0.25, 49.75),
    }


def _aggregate(
    rng: np.random.Generator,
    device: dict[str, Any],
    *,
    error: float = 0.0,
    latency: float = 1.0,
    output: np.ndarray | None = None,
    input_: np.ndarray | None = None,
    accuracy: float = 0.0,
    negative: float = 0.0,
    selftest: float = 0.002,
) -> dict[str, Any]:
    """Three days of a device's windows; the keyword arguments are the treatment's harm."""
    n = int(rng.poisson(device["inferences"]))
    out_p = device["output"] if output is None else output
    in_p = device["input"] if input_ is None else input_
    labelled = int(rng.binomial(n, 0.2))
    correct = int(rng.binomial(labelled, max(device["accuracy"] - accuracy, 0.0)))
    windows = 72
    return {
        "inference_count": n,
        "error_count": int(rng.binomial(n, min(device["error"] + error, 1.0))),
        "selftest_failure_count": int(rng.binomial(windows, selftest)),
        "window_count": windows,
        "latency": _sketch(rng, n, device["latency"] * latency),
        "outputs": {"class": [int(c) for c in rng.multinomial(n, out_p)]},
        "inputs": {"x": [int(c) for c in rng.multinomial(n, in_p)]},
        "feedback": {"thumbs_down": int(rng.binomial(n, device["negative"] + negative)), "up": 3},
        "labels": {"a": {"a": correct, "b": labelled - correct}} if labelled else {},
    }


def _arm(
    rng: np.random.Generator,
    count: int,
    prefix: str,
    *,
    install_failure: float = 0.0,
    treated: bool = False,
    **harm: Any,
) -> list[DeviceSample]:
    samples = []
    for i in range(count):
        device = _device(rng)
        samples.append(
            DeviceSample(
                device_id=f"{prefix}-{i:04d}",
                aggregate=_aggregate(rng, device, **harm),
                baseline=_aggregate(rng, device),
                install_succeeded=bool(rng.random() >= install_failure) if treated else None,
                batches_received=3,
                batches_expected=3,
            )
        )
    return samples


def _fleet(
    seed: int, treated: int = 150, control: int = 600, **harm: Any
) -> tuple[list[DeviceSample], list[DeviceSample]]:
    rng = np.random.default_rng(seed)
    install = harm.pop("install_failure", 0.0)
    return (
        _arm(rng, treated, "t", install_failure=install, treated=True, **harm),
        _arm(rng, control, "c"),
    )


def _share(t: list[DeviceSample], c: list[DeviceSample]) -> float:
    return len(t) / (len(t) + len(c))


def _gate(verdict: gates.Verdict, name: str) -> gates.GateResult:
    return next(g for g in verdict.gates if g.gate == name)


def test_a_a_fleets_never_fail_and_mostly_advance() -> None:
    decisions = []
    for seed in range(12):
        t, c = _fleet(seed)
        verdict = judge(t, c, expected_treatment_share=_share(t, c))
        assert verdict.decision != "fail", (seed, verdict.reason)
        decisions.append(verdict.decision)
    # The gates can also pass (150 treatment devices are often not yet conclusive on errors).
    assert decisions.count("advance-ok") >= 3, decisions


@pytest.mark.parametrize(
    ("effects", "gate"),
    [
        ({"error": 0.01}, "error_rate"),
        ({"latency": 1.5}, "latency"),
        ({"output": np.array([0.1, 0.2, 0.3, 0.4])}, "output_shift"),
        ({"input_": np.array([0.3, 0.3, 0.15, 0.15, 0.05, 0.05])}, "input_drift"),
        ({"accuracy": 0.08}, "accuracy"),
        ({"negative": 0.03}, "feedback"),
        ({"selftest": 0.05}, "selftest"),
        ({"install_failure": 0.4}, "install"),
    ],
    ids=["errors", "latency", "outputs", "inputs", "accuracy", "feedback", "selftest", "install"],
)
def test_a_clear_regression_fails_its_own_gate(effects: dict[str, Any], gate: str) -> None:
    t, c = _fleet(7, **effects)
    verdict = judge(t, c, expected_treatment_share=_share(t, c))
    assert verdict.decision == "fail", verdict.reason
    assert verdict.failed == (gate,), verdict.reason
    failed = _gate(verdict, gate)
    assert failed.lower is not None and failed.lower > 0
    assert failed.estimate is not None and failed.estimate > failed.threshold
    assert gate in verdict.reason  # the decision names the figures that failed


def test_thin_treatment_holds_whatever_the_harm() -> None:
    t, c = _fleet(3, treated=8, error=0.2, latency=3.0, accuracy=0.5, install_failure=1.0)
    verdict = judge(t, c, expected_treatment_share=_share(t, c))
    assert verdict.decision == "hold"
    assert "thin data: treatment has 8 devices, needs 30" in _gate(verdict, "error_rate").reason


def test_three_treatment_devices_never_fail_even_at_the_lowest_minimums() -> None:
    config = GateConfig(min_devices_per_arm=MIN_DEVICES_FLOOR, min_inferences_per_arm=1)
    for seed in range(10):
        t, c = _fleet(
            seed, treated=3, control=200, error=0.3, latency=4, accuracy=0.6, install_failure=1
        )
        verdict = judge(t, c, config, expected_treatment_share=_share(t, c))
        assert verdict.decision == "hold", verdict.reason
        assert all(g.status == "hold" or g.status == "no-data" for g in verdict.gates)


def test_config_refuses_minimums_below_the_floor() -> None:
    with pytest.raises(ValidationError, match="min_devices_per_arm"):
        GateConfig(min_devices_per_arm=3)


def test_sample_ratio_mismatch_holds() -> None:
    t, c = _fleet(5, treated=150, control=350)
    verdict = judge(t, c, expected_treatment_share=0.2)  # observed 0.3 of 500 devices
    srm = next(h for h in verdict.health if h.name == "sample_ratio")
    assert srm.status == "fail" and "sample-ratio mismatch" in srm.reason
    assert verdict.decision == "hold"
    matched = judge(t, c, expected_treatment_share=0.3)
    assert next(h for h in matched.health if h.name == "sample_ratio").status == "pass"


def test_low_completeness_holds() -> None:
    t, c = _fleet(6)
    t = [replace(s, batches_received=1, batches_expected=3) for s in t]
    verdict = judge(t, c, expected_treatment_share=_share(t, c))
    check = next(h for h in verdict.health if h.name == "completeness")
    assert check.status == "fail" and "treatment completeness 0.333" in check.reason
    assert verdict.decision == "hold"


def test_the_verdict_does_not_depend_on_sample_order() -> None:
    t, c = _fleet(11, error=0.003)
    first = judge(t, c, expected_treatment_share=_share(t, c)).to_dict()
    shuffler = random.Random(0)
    for _ in range(3):
        t2, c2 = t[:], c[:]
        shuffler.shuffle(t2)
        shuffler.shuffle(c2)
        assert judge(t2, c2, expected_treatment_share=_share(t, c)).to_dict() == first


def test_no_labels_is_no_data_unless_required() -> None:
    t, c = _fleet(12)
    strip = [replace(s, aggregate={**s.aggregate, "labels": {}}) for s in [*t, *c]]
    t, c = strip[: len(t)], strip[len(t) :]
    verdict = judge(t, c, expected_treatment_share=_share(t, c))
    assert _gate(verdict, "accuracy").status == "no-data"
    assert "accuracy" not in verdict.reason
    required = GateConfig(accuracy=AccuracyGate(required=True))
    held = judge(t, c, required, expected_treatment_share=_share(t, c))
    assert _gate(held, "accuracy").status == "hold" and held.decision == "hold"
    assert "accuracy: thin data: treatment has 0 devices, needs 30" in held.reason


def test_a_baseline_narrows_the_error_interval() -> None:
    t, c = _fleet(21)
    plain_t, plain_c = ([replace(s, baseline=None) for s in arm] for arm in (t, c))
    with_base = _gate(judge(t, c, expected_treatment_share=0.2), "error_rate")
    without = _gate(judge(plain_t, plain_c, expected_treatment_share=0.2), "error_rate")
    assert with_base.upper is not None and with_base.lower is not None
    assert without.upper is not None and without.lower is not None
    assert with_base.upper - with_base.lower < 0.7 * (without.upper - without.lower)


def test_the_sequence_holds_its_level_under_peeking_where_a_fixed_threshold_does_not() -> None:
    # A null difference observed at 100 looks: crossing the mixture boundary at any look stays
    # below alpha; crossing a fixed 1.96 z at any look does not (the peeking problem).
    rng = np.random.default_rng(0)
    paths, looks, alpha = 4000, 100, 0.05
    walks = np.cumsum(rng.normal(size=(paths, looks)), axis=1)
    n = np.arange(1, looks + 1)
    estimate, variance = walks / n, 1 / n
    bound = np.array([gates.mixture_halfwidth(v, 0.3, alpha) for v in variance])
    anytime = np.mean((np.abs(estimate) > bound).any(axis=1))
    fixed = np.mean((np.abs(estimate) > 1.96 * np.sqrt(variance)).any(axis=1))
    assert anytime < alpha
    assert fixed > 3 * alpha


@pytest.mark.parametrize(
    ("successes", "trials"), [(0, 50), (3, 50), (50, 50), (0, 0), (1, 3)], ids=str
)
def test_beta_binomial_sequence_contains_the_rate(successes: int, trials: int) -> None:
    lo, hi = gates.beta_binomial_cs(successes, trials, 0.01)
    rate = successes / trials if trials else 0.5
    assert 0 <= lo <= rate <= hi <= 1
    if trials:
        assert hi - lo < 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("error_count", -1, "device t-0000: field 'error_count' must be a count >= 0, got -1"),
        ("inference_count", "9", "field 'inference_count' must be a count"),
        ("outputs", {"class": [1, 2]}, "field 'outputs.class' has (2|4) bins, others (4|2)"),
        ("latency", {"bins": {}}, "device t-0000: field 'latency' is not a latency sketch"),
    ],
    ids=["negative", "string", "bins", "sketch"],
)
def test_a_malformed_sample_is_refused_naming_device_and_field(
    field: str, value: Any, message: str
) -> None:
    t, c = _fleet(1, treated=40, control=40)
    t[0] = replace(t[0], aggregate={**t[0].aggregate, field: value})
    with pytest.raises(GateInputError, match=message):
        judge(t, c, expected_treatment_share=0.5)


def test_a_device_in_both_arms_is_refused() -> None:
    t, c = _fleet(1, treated=40, control=40)
    with pytest.raises(GateInputError, match="device t-0000 appears twice"):
        judge(t, [*c, t[0]], expected_treatment_share=0.5)
