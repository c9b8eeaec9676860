"""The gates that read a rollout's shadow and data-quality counts. Pure, as :mod:`server.gates`
(whose rule and result shape they share): samples and a config in, gate results out.

* ``shadow_agreement`` (shadow rollouts): the treatment devices' candidate agreed with the
  answering version on ``agreed`` of ``compared`` calls; the beta-binomial confidence sequence
  of that share (exact at any number of looks) fails the gate when its upper bound is under
  ``min_agreement``, passes it when its lower bound is at or above, else holds.
* ``data_quality`` (off by default): each arm's share of calls with a data-quality problem
  (refused by the schema check, or a missing value); fails when the treatment's share is
  significantly above the control's (the two sequences apart) and more than ``max_increase``
  above, passes when the largest difference the sequences allow is under ``max_increase``.

Both pool calls over the arm's devices, which treats calls as independent: a device with a
skewed input stream weighs with its call count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.gates import (
    DeviceSample,
    GateConfig,
    GateResult,
    Status,
    Verdict,
    beta_binomial_cs,
    proportion_gate,
)
from server.gates import _verdict as verdict


def shadow_totals(samples: Sequence[DeviceSample], candidate: str) -> tuple[int, int, int]:
    """Devices that compared, calls compared and calls agreed for ``candidate`` in shadow."""
    devices = compared = agreed = 0
    for sample in samples:
        entry = (sample.aggregate.get("shadow") or {}).get(candidate)
        if entry and entry["compared"]:
            devices += 1
            compared += int(entry["compared"])
            agreed += int(entry["agreed"])
    return devices, compared, agreed


def shadow_agreement(
    treatment: Sequence[DeviceSample], candidate: str, config: GateConfig, alpha: float
) -> GateResult:
    """The ``shadow_agreement`` gate for ``candidate`` over the treatment devices."""
    spec = config.shadow_agreement
    devices, compared, agreed = shadow_totals(treatment, candidate)
    threshold = spec.min_agreement
    if compared < spec.min_compared or devices < 1:
        status: Status = "hold" if spec.required else "no-data"
        reason = (
            f"thin data: {compared} shadow comparisons on {devices} devices, needs"
            f" {spec.min_compared}"
        )
        return GateResult(
            "shadow_agreement", status, reason, threshold, alpha, treatment_devices=devices
        )
    return proportion_gate(
        "shadow_agreement",
        agreed,
        compared,
        "agreed",
        threshold=threshold,
        alpha=alpha,
        harm_above=False,
        devices=devices,
        inferences=compared,
    )


def problem_calls(agg: Mapping[str, Any]) -> tuple[int, int]:
    """Calls with a data-quality problem (refused, plus missing values, at most one per call
    counted as the number of missing values) and all calls, of one aggregate."""
    quality = agg.get("quality") or {}
    refused = sum(int(c) for c in (quality.get("refused") or {}).values())
    missing = sum(int(c) for c in (quality.get("missing") or {}).values())
    calls = int(agg.get("inference_count", 0))
    return min(refused + missing, calls), calls


def data_quality(
    treatment: Sequence[DeviceSample],
    control: Sequence[DeviceSample],
    config: GateConfig,
    alpha: float,
) -> GateResult:
    """The ``data_quality`` gate: the treatment's problem share against the control's."""
    spec = config.data_quality
    arms = []
    for samples in (treatment, control):
        pairs = [problem_calls(s.aggregate) for s in samples]
        arms.append((sum(p for p, _ in pairs), sum(n for _, n in pairs)))
    (p_t, n_t), (p_c, n_c) = arms
    base = dict(
        treatment_devices=len(treatment),
        control_devices=len(control),
        treatment_inferences=n_t,
        control_inferences=n_c,
    )
    if not n_t or not n_c:
        status: Status = "hold" if spec.required else "no-data"
        return GateResult(
            "data_quality",
            status,
            "thin data: an arm has no calls",
            spec.max_increase,
            alpha,
            **base,
        )
    # Each arm's sequence at alpha / 2, so both hold together with probability 1 - alpha.
    lo_t, hi_t = beta_binomial_cs(p_t, n_t, alpha / 2)
    lo_c, hi_c = beta_binomial_cs(p_c, n_c, alpha / 2)
    estimate = p_t / n_t - p_c / n_c
    lower, upper = lo_t - hi_c, hi_t - lo_c
    figures = (
        f"problem share {p_t / n_t:.3g} against {p_c / n_c:.3g} (difference {estimate:.3g},"
        f" sequence {lower:.3g}..{upper:.3g})"
    )
    limit = f"above +{spec.max_increase:.3g}"
    status, reason = verdict(
        "data_quality", lower > 0, estimate, upper, spec.max_increase, figures, limit
    )
    return GateResult(
        "data_quality",
        status,
        reason,
        spec.max_increase,
        alpha,
        estimate=estimate,
        lower=lower,
        upper=upper,
        treatment_value=p_t / n_t,
        control_value=p_c / n_c,
        **base,
    )


def with_results(verdict: Verdict, extra: Sequence[GateResult]) -> Verdict:
    """``verdict`` with more gate results, its decision taken again by the same rule: any
    failure fails, else any hold holds."""
    if not extra:
        return verdict
    results = (*verdict.gates, *extra)
    failed = tuple(r.gate for r in results if r.status == "fail")
    if failed:
        why = "; ".join(r.reason for r in results if r.status == "fail")
        return Verdict("fail", why, results, verdict.health, failed)
    holding = [f"{r.gate}: {r.reason}" for r in extra if r.status == "hold"]
    if verdict.decision == "hold" or holding:
        reason = "; ".join(
            x for x in (verdict.reason if verdict.decision == "hold" else "", *holding) if x
        )
        return Verdict("hold", reason, results, verdict.health)
    return Verdict(verdict.decision, verdict.reason, results, verdict.health)


def judge_extra(
    treatment: Sequence[DeviceSample],
    control: Sequence[DeviceSample],
    config: GateConfig,
    *,
    shadow_candidate: str | None,
) -> list[GateResult]:
    """The shadow and data-quality gates a rollout has on (``shadow_candidate``: the version
    a shadow rollout runs in shadow, None for a normal rollout)."""
    on = []
    if shadow_candidate is not None and config.shadow_agreement.enabled:
        on.append("shadow_agreement")
    if config.data_quality.enabled:
        on.append("data_quality")
    alpha = config.alpha / max(len(config.enabled_gates()) + len(on), 1)
    results = []
    if "shadow_agreement" in on:
        assert shadow_candidate is not None
        results.append(shadow_agreement(treatment, shadow_candidate, config, alpha))
    if "data_quality" in on:
        results.append(data_quality(treatment, control, config, alpha))
    return results
