"""Rollout gates: per-device samples of a treatment and a control arm and a config in, a verdict
per gate with its figures out. Pure (no I/O, no database, no clock); Kayenta's judge is the model.

The device is the unit of analysis (windows from one device are not independent): each device gives
one value per gate, and arms are compared on device-weighted means (weight ``n / (n + k)`` for a
device with ``n`` observations, so it grows with the device's evidence and levels off where the
device-to-device spread outweighs its own noise). Too little evidence is a result ("hold", or
"no-data" for an optional gate), never a failure.

Why the verdict stays valid when it is asked again and again as late data arrives:

* Two-arm gates (error, self-test and negative-feedback rates, accuracy, the log of each device's
  latency quantile): the difference of weighted arm means, each device's value less ``theta`` times
  its value on the previous version before the rollout when given (CUPED; ``theta`` is fitted on
  both arms pooled, blind to the arm), with a sandwich variance ``v`` from the device spread. Its
  interval is Robbins' normal-mixture confidence sequence, ``estimate +- sqrt(v (1+r)/r (log(1+r) +
  2 log(1/alpha)))`` with ``r = tau**2 / v`` and the mixture scale ``tau`` the gate's threshold:
  for a Gaussian score in information time ``1/v`` the mixture is a nonnegative martingale, so by
  Ville's inequality the chance that the sequence EVER excludes the true difference, at any number
  and timing of looks, is at most ``alpha``. By the device-level CLT this holds asymptotically
  (Waudby-Smith et al. 2021, "Time-uniform central limit theory"), hence the minimum devices.
* Install failures (treatment only) and sample-ratio mismatch: the beta-binomial mixture of
  likelihood ratios is a nonnegative martingale for each true probability, so its confidence
  sequence is exact at any sample size (Robbins 1970), no asymptotics needed.
* Distribution shifts (Jensen-Shannon bits between arms' outputs, PSI per input): per class, the
  difference of device-weighted share means gets the sequence above at ``alpha`` split over the
  classes (Bonferroni), so the chance that any class is ever called shifted in an A/A rollout is at
  most ``alpha``; the divergence's bounds move every class difference to the near or far edge of its
  interval (approximate, conservative in the far direction).
* ``alpha`` is split over the enabled gates, so an A/A rollout fails some gate with probability at
  most ``alpha`` over all looks. A gate fails only when the harm is significant (lower bound > 0)
  AND its estimate is beyond the threshold (Kayenta's rule), and passes only when the upper bound
  is below the threshold (the harm is shown to be tolerable); in between it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import optimize, special

from firmware_bundles import telemetry
from server.errors import ServerError

Status = Literal["pass", "fail", "hold", "no-data"]
Decision = Literal["advance-ok", "fail", "hold"]

#: Fewest devices per arm a gate may ever be judged on: below this the device-level CLT behind
#: the sequences is not trusted, so a config cannot ask for less.
MIN_DEVICES_FLOOR = 10
#: Shares below this count as this in divergences (an empty bin would make PSI infinite).
SHARE_FLOOR = 1e-4
_RATE_GATES = ("error_rate", "selftest", "feedback", "accuracy", "latency")


class GateInputError(ServerError, ValueError):
    """A sample cannot be judged: the message names the device and the field."""


class _Gate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    #: When False, too little evidence is "no-data" and does not hold the stage.
    required: bool = True


class RateGate(_Gate):
    """Harm when the treatment's per-device rate exceeds the control's by more than this."""

    max_increase: float = Field(gt=0, le=1)


class InstallGate(_Gate):
    """Harm when more than this share of treatment devices fail to install and self-test."""

    max_failure_rate: float = Field(default=0.10, gt=0, lt=1)


class LatencyGate(_Gate):
    quantile: float = Field(default=0.95, gt=0, lt=1)
    max_relative_increase: float = Field(default=0.10, gt=0)
    #: A device's own quantile is used once it has this many latencies.
    min_inferences_per_device: int = Field(default=20, ge=1)


class OutputShiftGate(_Gate):
    max_js_bits: float = Field(default=0.02, gt=0, le=1)


class InputDriftGate(_Gate):
    max_psi: float = Field(default=0.10, gt=0)


class FeedbackGate(RateGate):
    max_increase: float = Field(default=0.005, gt=0, le=1)
    negative_kinds: tuple[str, ...] = ("thumbs_down", "negative")


class AccuracyGate(_Gate):
    required: bool = False  # labels may never come for a model without label feedback
    max_drop: float = Field(default=0.015, gt=0, le=1)
    min_labels_per_arm: int = Field(default=300, ge=1)


class ShadowAgreementGate(_Gate):
    """A shadow rollout's candidate must agree with the answering version on at least this
    share of the compared calls (judged by :mod:`server.shadow_gates`)."""

    min_agreement: float = Field(default=0.9, gt=0, le=1)
    min_compared: int = Field(default=300, ge=1)


class DataQualityGate(_Gate):
    """Harm when the treatment's share of calls with a data-quality problem (refused by the
    schema check, or a missing value) exceeds the control's by more than this (judged by
    :mod:`server.shadow_gates`); off unless a plan turns it on."""

    enabled: bool = False
    max_increase: float = Field(default=0.01, gt=0, le=1)


class GateConfig(BaseModel):
    """Which gates are on and their thresholds; the defaults need no flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Chance, over all looks, that an A/A rollout fails any gate (split over enabled gates).
    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_devices_per_arm: int = Field(default=30, ge=MIN_DEVICES_FLOOR)
    min_inferences_per_arm: int = Field(default=2000, ge=1)
    #: ``k`` in the device weight ``n / (n + k)``.
    device_weight_half_count: float = Field(default=50.0, gt=0)
    error_rate: RateGate = RateGate(max_increase=0.0025)
    selftest: RateGate = RateGate(max_increase=0.01)  # self-test failures per window
    install: InstallGate = InstallGate()
    latency: LatencyGate = LatencyGate()
    output_shift: OutputShiftGate = OutputShiftGate()
    input_drift: InputDriftGate = InputDriftGate()
    feedback: FeedbackGate = FeedbackGate()
    accuracy: AccuracyGate = AccuracyGate()
    srm_alpha: float = Field(default=0.001, gt=0, lt=1)
    min_completeness: float = Field(default=0.7, ge=0, le=1)
    #: Judged only for shadow rollouts.
    shadow_agreement: ShadowAgreementGate = ShadowAgreementGate()
    data_quality: DataQualityGate = DataQualityGate()

    def enabled_gates(self) -> tuple[str, ...]:
        names = (*_RATE_GATES, "install", "output_shift", "input_drift")
        return tuple(n for n in names if getattr(self, n).enabled)


@dataclass(frozen=True)
class DeviceSample:
    """One device's evidence over the evaluation period.

    Attributes:
        device_id: The device.
        aggregate: Its windows on its arm's version, in the server's aggregate form
            (``inference_count``, ``error_count``, ``selftest_failure_count``, ``window_count``,
            ``latency`` sketch, ``outputs``, ``inputs``, ``feedback``, ``labels``).
        baseline: The same form for its windows on the previous version before the rollout
            started (the same calendar period for both arms), or None; sharpens the rate gates.
        install_succeeded: True once it reported the new version running and self-tested, False
            if it reported a failure, None if not known (and for control devices).
        batches_received: Telemetry batches received; ``batches_expected`` those the sequence
            numbers say were sent.
    """

    device_id: str
    aggregate: Mapping[str, Any]
    baseline: Mapping[str, Any] | None = None
    install_succeeded: bool | None = None
    batches_received: int = 0
    batches_expected: int = 0


@dataclass(frozen=True)
class Metric:
    """Per-device values of one two-arm gate (NaN: no evidence) and the evidence behind each."""

    values: np.ndarray
    counts: np.ndarray
    baseline: np.ndarray | None = None  # the same value on the previous version (NaN: none)


@dataclass(frozen=True)
class ArmData:
    """One arm in columns, one row per device (what :func:`judge_arms` reads)."""

    devices: int
    inferences: np.ndarray
    metrics: Mapping[str, Metric]
    outputs: Mapping[str, np.ndarray]  # name -> (devices, bins) counts
    inputs: Mapping[str, np.ndarray]
    install_failed: np.ndarray  # 1.0 failed, 0.0 succeeded, NaN unknown
    batches_received: int = 0
    batches_expected: int = 0
    merged_latency_quantile: float | None = None  # the arm's merged sketch (a figure only)


@dataclass(frozen=True)
class GateResult:
    """One gate's status and the figures it was decided on (harm is positive)."""

    gate: str
    status: Status
    reason: str
    threshold: float
    alpha: float
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    treatment_value: float | None = None
    control_value: float | None = None
    treatment_devices: int = 0
    control_devices: int = 0
    treatment_inferences: int = 0
    control_inferences: int = 0


@dataclass(frozen=True)
class HealthCheck:
    name: str
    status: Literal["pass", "fail", "no-data"]
    reason: str
    observed: float | None = None
    expected: float | None = None


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    gates: tuple[GateResult, ...]
    health: tuple[HealthCheck, ...]
    failed: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(
    treatment: Sequence[DeviceSample],
    control: Sequence[DeviceSample],
    config: GateConfig | None = None,
    *,
    expected_treatment_share: float,
) -> Verdict:
    """Judge a stage: one sample per device assigned to each arm (no data yet: zero counts).

    Raises:
        GateInputError: A sample is malformed or a device is in both arms or twice.
    """
    config = config or GateConfig()
    seen: set[str] = set()
    for sample in [*treatment, *control]:
        if sample.device_id in seen:
            raise GateInputError(f"device {sample.device_id} appears twice in the samples")
        seen.add(sample.device_id)
    return judge_arms(
        arm_data(treatment, config),
        arm_data(control, config),
        config,
        expected_treatment_share=expected_treatment_share,
    )


def judge_arms(
    treatment: ArmData,
    control: ArmData,
    config: GateConfig,
    *,
    expected_treatment_share: float,
) -> Verdict:
    """:func:`judge` on arms already in columns (the benchmark calls this directly)."""
    if not 0 < expected_treatment_share < 1:
        raise GateInputError(f"expected_treatment_share {expected_treatment_share} not in (0, 1)")
    enabled = config.enabled_gates()
    alpha = config.alpha / max(len(enabled), 1)
    results: list[GateResult] = []
    for name in enabled:
        if name in _RATE_GATES:
            results.append(_two_arm_gate(name, treatment, control, config, alpha))
        elif name == "install":
            results.append(_install_gate(treatment, config, alpha))
        else:
            results.append(_shift_gate(name, treatment, control, config, alpha))
    health = (
        _srm(treatment.devices, control.devices, expected_treatment_share, config.srm_alpha),
        _completeness(treatment, control, config.min_completeness),
    )
    failed = tuple(r.gate for r in results if r.status == "fail")
    if failed:
        why = "; ".join(r.reason for r in results if r.status == "fail")
        return Verdict("fail", why, tuple(results), health, failed)
    holding = [f"{r.gate}: {r.reason}" for r in results if r.status == "hold"]
    holding += [f"{h.name}: {h.reason}" for h in health if h.status == "fail"]
    if holding:
        return Verdict("hold", "; ".join(holding), tuple(results), health)
    return Verdict("advance-ok", "every gate passed", tuple(results), health)


# --- statistics --------------------------------------------------------------------------------


def mixture_halfwidth(variance: float, tau: float, alpha: float) -> float:
    """Half-width of Robbins' normal-mixture confidence sequence (two-sided, level ``alpha``)."""
    if variance <= 0:
        return 0.0
    r = tau * tau / variance
    return math.sqrt(variance * (1 + r) / r * (math.log1p(r) + 2 * math.log(1 / alpha)))


def beta_binomial_cs(
    successes: int, trials: int, alpha: float, prior: tuple[float, float] = (1.0, 1.0)
) -> tuple[float, float]:
    """Exact confidence sequence for a Bernoulli probability: ``{p : M(p) < 1/alpha}`` for the
    beta-mixture likelihood ratio ``M``, which is at most 1 at ``successes / trials``."""
    if trials == 0:
        return 0.0, 1.0
    a, b = prior
    s, f = successes, trials - successes
    log_mix = special.betaln(a + s, b + f) - special.betaln(a, b)
    bound = math.log(1 / alpha)

    def excess(p: float) -> float:
        return float(log_mix - special.xlogy(s, p) - special.xlog1py(f, -p) - bound)

    p_hat = s / trials
    tiny = 1e-12
    lower = 0.0 if s == 0 or excess(tiny) < 0 else optimize.brentq(excess, tiny, p_hat)
    upper = 1.0 if f == 0 or excess(1 - tiny) < 0 else optimize.brentq(excess, p_hat, 1 - tiny)
    return float(lower), float(upper)


def _weighted_mean(y: np.ndarray, w: np.ndarray) -> tuple[Any, Any]:
    """Weighted mean and its sandwich variance (devices independent), per column of ``y``."""
    total = float(w.sum())
    wy = w if y.ndim == 1 else w[:, None]
    mean = (wy * y).sum(axis=0) / total
    n = len(y)
    var = (wy * wy * (y - mean) ** 2).sum(axis=0) / total**2 * n / max(n - 1, 1)
    return mean, var


def _difference(
    t: Metric, c: Metric, k: float
) -> tuple[float, float, float, float, int, int, np.ndarray, np.ndarray]:
    """Treatment minus control on devices with evidence, CUPED-adjusted when baselines exist."""
    mt, mc = ~np.isnan(t.values), ~np.isnan(c.values)
    yt, yc = t.values[mt], c.values[mc]
    wt, wc = t.counts[mt] / (t.counts[mt] + k), c.counts[mc] / (c.counts[mc] + k)
    raw_t, raw_c = float(np.average(yt, weights=wt)), float(np.average(yc, weights=wc))
    if t.baseline is not None and c.baseline is not None:
        xt, xc = t.baseline[mt], c.baseline[mc]
        x, y, w = np.concatenate([xt, xc]), np.concatenate([yt, yc]), np.concatenate([wt, wc])
        known = ~np.isnan(x)
        if known.sum() >= MIN_DEVICES_FLOOR:
            x_mean = float(np.average(x[known], weights=w[known]))
            xk, yk, wk = x[known] - x_mean, y[known], w[known]
            sxx = float((wk * xk * xk).sum())
            theta = float((wk * xk * (yk - np.average(yk, weights=wk))).sum() / sxx) if sxx else 0.0
            # A device without a baseline counts at the pooled mean: no adjustment, no bias.
            yt = yt - theta * np.nan_to_num(xt - x_mean)
            yc = yc - theta * np.nan_to_num(xc - x_mean)
    mean_t, var_t = _weighted_mean(yt, wt)
    mean_c, var_c = _weighted_mean(yc, wc)
    diff, var = float(mean_t - mean_c), float(var_t + var_c)
    return diff, var, raw_t, raw_c, len(yt), len(yc), mt, mc


def _thin(
    what: str, devices: tuple[int, int], amount: tuple[float, float], need: float, cfg: GateConfig
) -> str | None:
    for arm, n, got in zip(("treatment", "control"), devices, amount, strict=True):
        if n < cfg.min_devices_per_arm:
            return f"thin data: {arm} has {n} devices, needs {cfg.min_devices_per_arm}"
        if got < need:
            return f"thin data: {arm} has {int(got)} {what}, needs {int(need)}"
    return None


def _two_arm_gate(name: str, t: ArmData, c: ArmData, cfg: GateConfig, alpha: float) -> GateResult:
    spec = getattr(cfg, name)
    if name == "accuracy":
        sign, threshold, tau, need, what = -1.0, spec.max_drop, spec.max_drop, 0.0, "labels"
        need = float(spec.min_labels_per_arm)
    elif name == "latency":
        threshold = spec.max_relative_increase
        sign, tau, need, what = 1.0, math.log1p(threshold), cfg.min_inferences_per_arm, "latencies"
    else:
        sign, threshold, tau = 1.0, spec.max_increase, spec.max_increase
        need, what = (
            (0.0, "windows") if name == "selftest" else (cfg.min_inferences_per_arm, "inferences")
        )
    tm, cm = t.metrics.get(name), c.metrics.get(name)
    base = GateResult(name, "hold", "", threshold, alpha)
    if tm is None or cm is None:
        return _no_data(base, spec.required, "no data of this kind in an arm")
    nt, nc = int((~np.isnan(tm.values)).sum()), int((~np.isnan(cm.values)).sum())
    inf_t = int(t.inferences[~np.isnan(tm.values)].sum())
    inf_c = int(c.inferences[~np.isnan(cm.values)].sum())
    evidence = (
        float(np.nansum(tm.counts * ~np.isnan(tm.values))),
        float(np.nansum(cm.counts * ~np.isnan(cm.values))),
    )
    base = _pending(name, threshold, alpha, (nt, nc), (inf_t, inf_c))
    thin = _thin(what, (nt, nc), evidence, need, cfg)
    if thin is not None:
        return _no_data(base, spec.required, thin)
    diff, var, raw_t, raw_c, *_ = _difference(tm, cm, cfg.device_weight_half_count)
    est, h = sign * diff, mixture_halfwidth(var, tau, alpha)
    lo, hi = est - h, est + h
    if name == "latency":  # log-ratio of quantiles -> relative increase
        est, lo, hi = math.expm1(est), math.expm1(lo), math.expm1(hi)
        raw_t, raw_c = math.exp(raw_t), math.exp(raw_c)
    figures = f"harm {est:+.4g} (sequence {lo:+.4g}..{hi:+.4g}), threshold {threshold:.4g}"
    status, reason = _verdict(
        name, lo > 0, est, hi, threshold, figures, "significant and beyond the threshold"
    )
    return GateResult(
        name, status, reason, threshold, alpha, est, lo, hi, raw_t, raw_c, nt, nc, inf_t, inf_c
    )


def _verdict(
    name: str,
    significant: bool,
    est: float,
    hi: float,
    threshold: float,
    figures: str,
    failed: str,
) -> tuple[Status, str]:
    """The rule of every gate: fail when the harm is significant and its estimate beyond the
    threshold, pass when its upper bound is below the threshold, else hold; with the reason."""
    if significant and est > threshold:
        return "fail", f"{name}: {figures}: {failed}"
    if hi < threshold:
        return "pass", f"{figures}: below the threshold"
    return "hold", f"not yet conclusive: {figures}"


def _pending(
    name: str, threshold: float, alpha: float, devices: tuple[int, int], inferences: tuple[int, int]
) -> GateResult:
    """A gate's result before it is decided: its counts, status hold."""
    return GateResult(
        name,
        "hold",
        "",
        threshold,
        alpha,
        treatment_devices=devices[0],
        control_devices=devices[1],
        treatment_inferences=inferences[0],
        control_inferences=inferences[1],
    )


def _no_data(base: GateResult, required: bool, reason: str) -> GateResult:
    status: Status = "hold" if required else "no-data"
    return GateResult(**{**asdict(base), "status": status, "reason": reason})


def _install_gate(t: ArmData, cfg: GateConfig, alpha: float) -> GateResult:
    spec = cfg.install
    known = t.install_failed[~np.isnan(t.install_failed)]
    n, failures = len(known), int(known.sum())
    base = GateResult(
        "install",
        "hold",
        "",
        spec.max_failure_rate,
        alpha,
        treatment_devices=n,
        treatment_inferences=int(t.inferences.sum()),
    )
    if n < cfg.min_devices_per_arm:
        reason = (
            f"thin data: {n} treatment devices reported an install, needs {cfg.min_devices_per_arm}"
        )
        return _no_data(base, spec.required, f"{reason} ({failures} failed)")
    # A prior centred on small failure rates keeps the bound tight where it matters.
    lo, hi = beta_binomial_cs(failures, n, alpha, prior=(1.0, 19.0))
    rate = failures / n
    figures = f"{failures}/{n} failed ({rate:.3g}, sequence {lo:.3g}..{hi:.3g})"
    if lo > spec.max_failure_rate:
        status: Status = "fail"
        reason = f"install: {figures} above {spec.max_failure_rate:.3g}"
    elif hi < spec.max_failure_rate:
        status, reason = "pass", f"{figures} below {spec.max_failure_rate:.3g}"
    else:
        status, reason = "hold", f"not yet conclusive: {figures}"
    return GateResult(
        "install",
        status,
        reason,
        spec.max_failure_rate,
        alpha,
        rate,
        lo,
        hi,
        rate,
        None,
        n,
        0,
        base.treatment_inferences,
        0,
    )


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two share vectors."""
    m = (p + q) / 2
    kl = special.rel_entr(p, m).sum() + special.rel_entr(q, m).sum()
    return float(kl / 2 / math.log(2))


def psi(p: np.ndarray, q: np.ndarray) -> float:
    """Population stability index of ``p`` against ``q`` (shares floored at ``SHARE_FLOOR``)."""
    p, q = np.maximum(p, SHARE_FLOOR), np.maximum(q, SHARE_FLOOR)
    return float(((p - q) * np.log(p / q)).sum())


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else counts.astype(float)


def _shift_gate(name: str, t: ArmData, c: ArmData, cfg: GateConfig, alpha: float) -> GateResult:
    """JS on outputs or PSI on inputs, per histogram; the worst histogram is reported."""
    spec = getattr(cfg, name)
    threshold = spec.max_js_bits if name == "output_shift" else spec.max_psi
    divergence = js_bits if name == "output_shift" else psi
    # The mixture scale: the share move that alone reaches the threshold (chi-square equivalent).
    chi2 = 8 * math.log(2) * threshold if name == "output_shift" else threshold
    th, ch = (t.outputs, c.outputs) if name == "output_shift" else (t.inputs, c.inputs)
    names = sorted(set(th) & set(ch))
    base = GateResult(name, "hold", "", threshold, alpha)
    if not names:
        return _no_data(base, spec.required, "no histograms of this kind in both arms")
    classes = sum(th[n].shape[1] for n in names)
    k = cfg.device_weight_half_count
    worst: GateResult | None = None
    for hist in names:
        ct, cc = th[hist], ch[hist]
        tot_t, tot_c = ct.sum(axis=1), cc.sum(axis=1)
        mt, mc = tot_t > 0, tot_c > 0
        nt, nc = int(mt.sum()), int(mc.sum())
        inf_t, inf_c = int(tot_t.sum()), int(tot_c.sum())
        here = _pending(name, threshold, alpha, (nt, nc), (inf_t, inf_c))
        thin = _thin("observations", (nt, nc), (inf_t, inf_c), cfg.min_inferences_per_arm, cfg)
        if thin is not None:
            result = _no_data(here, spec.required, f"{hist}: {thin}")
        else:
            st, sc = ct[mt] / tot_t[mt, None], cc[mc] / tot_c[mc, None]
            wt, wc = tot_t[mt] / (tot_t[mt] + k), tot_c[mc] / (tot_c[mc] + k)
            mean_t, var_t = _weighted_mean(st, wt)
            mean_c, var_c = _weighted_mean(sc, wc)
            pooled = _shares(ct.sum(axis=0) + cc.sum(axis=0))
            taus = np.sqrt(chi2 * np.maximum(pooled, 1e-3) / 2)
            delta = mean_t - mean_c
            half = np.array(
                [
                    mixture_halfwidth(float(v), float(tau), alpha / classes)
                    for v, tau in zip(var_t + var_c, taus, strict=True)
                ]
            )
            p_t, p_c = _shares(ct.sum(axis=0)), _shares(cc.sum(axis=0))
            est = divergence(p_t, p_c)
            near = np.sign(delta) * np.maximum(np.abs(delta) - half, 0)
            far = np.where(delta >= 0, delta + half, delta - half)
            lo = divergence(_moved(p_c, near), p_c)
            hi = divergence(_moved(p_c, far), p_c)
            figures = f"{hist} {est:.4g} (bounds {lo:.4g}..{hi:.4g}), threshold {threshold:.4g}"
            moved = bool(np.any(near != 0))
            status, reason = _verdict(
                name,
                moved,
                est,
                hi,
                threshold,
                figures,
                "a share moved significantly, beyond the threshold",
            )
            result = GateResult(
                name,
                status,
                reason,
                threshold,
                alpha,
                est,
                lo,
                hi,
                None,
                None,
                nt,
                nc,
                inf_t,
                inf_c,
            )
        worst = result if worst is None else _worse(worst, result)
    assert worst is not None
    return worst


def _moved(p: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return _shares(np.maximum(p + shift, 0.0))


_RANK = {"fail": 3, "hold": 2, "no-data": 1, "pass": 0}


def _worse(a: GateResult, b: GateResult) -> GateResult:
    ka, kb = (_RANK[a.status], a.estimate or 0.0), (_RANK[b.status], b.estimate or 0.0)
    return b if kb > ka else a


def _srm(n_t: int, n_c: int, expected: float, alpha: float) -> HealthCheck:
    total = n_t + n_c
    if total == 0:
        return HealthCheck("sample_ratio", "no-data", "no devices in either arm", None, expected)
    lo, hi = beta_binomial_cs(n_t, total, alpha)
    share = n_t / total
    figures = f"treatment share {share:.4g} of {total} devices (sequence {lo:.4g}..{hi:.4g})"
    if lo <= expected <= hi:
        return HealthCheck(
            "sample_ratio", "pass", f"{figures}, expected {expected:.4g}", share, expected
        )
    return HealthCheck(
        "sample_ratio",
        "fail",
        f"sample-ratio mismatch: {figures}, expected {expected:.4g}",
        share,
        expected,
    )


def _completeness(t: ArmData, c: ArmData, minimum: float) -> HealthCheck:
    ratios = {
        arm: a.batches_received / a.batches_expected
        for arm, a in (("treatment", t), ("control", c))
        if a.batches_expected > 0
    }
    if not ratios:
        return HealthCheck(
            "completeness", "no-data", "no batch sequence numbers yet", None, minimum
        )
    arm, low = min(ratios.items(), key=lambda kv: kv[1])
    status: Literal["pass", "fail"] = "pass" if low >= minimum else "fail"
    word = "at least" if status == "pass" else "below"
    return HealthCheck(
        "completeness", status, f"{arm} completeness {low:.3g}, {word} {minimum:.3g}", low, minimum
    )


# --- samples to columns ------------------------------------------------------------------------

_COUNT_FIELDS = ("inference_count", "error_count", "selftest_failure_count", "window_count")


def arm_data(samples: Sequence[DeviceSample], config: GateConfig) -> ArmData:
    """One arm's samples in columns, sorted by device id (so sample order never matters).

    Raises:
        GateInputError: Naming the device and field of a malformed sample.
    """
    ordered = sorted(samples, key=lambda s: s.device_id)
    rows = [_device_row(s.aggregate, s.device_id, config) for s in ordered]
    bases = [
        _device_row(s.baseline, s.device_id, config) if s.baseline is not None else None
        for s in ordered
    ]
    metrics: dict[str, Metric] = {}
    for name in _RATE_GATES:
        values = np.array([r["metrics"][name][0] for r in rows], dtype=float)
        counts = np.array([r["metrics"][name][1] for r in rows], dtype=float)
        baseline = np.array(
            [b["metrics"][name][0] if b is not None else np.nan for b in bases], dtype=float
        )
        metrics[name] = Metric(values, counts, None if np.isnan(baseline).all() else baseline)
    merged = telemetry.new_sketch(float(rows[0]["latency"]["relative_accuracy"]) if rows else 0.01)
    for s, r in zip(ordered, rows, strict=True):
        try:
            telemetry.merge(merged, r["latency"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GateInputError(f"device {s.device_id}: field 'latency': {exc}") from exc
    return ArmData(
        devices=len(ordered),
        inferences=np.array([r["inferences"] for r in rows], dtype=float),
        metrics=metrics,
        outputs=_histograms(ordered, rows, "outputs"),
        inputs=_histograms(ordered, rows, "inputs"),
        install_failed=np.array(
            [
                np.nan if s.install_succeeded is None else float(not s.install_succeeded)
                for s in ordered
            ],
            dtype=float,
        ),
        batches_received=sum(
            _count(s.batches_received, s.device_id, "batches_received") for s in ordered
        ),
        batches_expected=sum(
            _count(s.batches_expected, s.device_id, "batches_expected") for s in ordered
        ),
        merged_latency_quantile=telemetry.quantile(merged, config.latency.quantile),
    )


def _count(value: Any, device: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GateInputError(f"device {device}: field {name!r} must be a count >= 0, got {value!r}")
    return value


def _device_row(agg: Mapping[str, Any], device: str, config: GateConfig) -> dict[str, Any]:
    """A device's per-gate values (NaN where it has no evidence) from its aggregate."""
    counts = {}
    for name in _COUNT_FIELDS:
        counts[name] = _count(agg.get(name, 0), device, name)
    n, windows = counts["inference_count"], counts["window_count"]
    latency = agg.get("latency") or telemetry.new_sketch()
    if not isinstance(latency, Mapping) or "count" not in latency:
        raise GateInputError(f"device {device}: field 'latency' is not a latency sketch")
    feedback = agg.get("feedback") or {}
    negative = sum(
        _count(feedback.get(k, 0), device, f"feedback.{k}") for k in config.feedback.negative_kinds
    )
    correct = labelled = 0
    for predicted, by_label in (agg.get("labels") or {}).items():
        for label, c in by_label.items():
            labelled += _count(c, device, f"labels.{predicted}.{label}")
            correct += c if label == predicted else 0
    n_lat = int(latency["count"])
    q = telemetry.quantile(dict(latency), config.latency.quantile) if n_lat else None
    enough = n_lat >= config.latency.min_inferences_per_device and q is not None
    nan = float("nan")
    return {
        "inferences": n,
        "latency": latency,
        "outputs": agg.get("outputs") or {},
        "inputs": agg.get("inputs") or {},
        "metrics": {
            "error_rate": (counts["error_count"] / n if n else nan, n),
            "selftest": (counts["selftest_failure_count"] / windows if windows else nan, windows),
            "feedback": (negative / n if n else nan, n),
            "accuracy": (correct / labelled if labelled else nan, labelled),
            "latency": (
                math.log(max(q, telemetry.MIN_POSITIVE)) if enough and q is not None else nan,
                n_lat,
            ),
        },
    }


def _histograms(
    samples: Sequence[DeviceSample], rows: Sequence[dict[str, Any]], kind: str
) -> dict[str, np.ndarray]:
    width: dict[str, int] = {}
    for s, r in zip(samples, rows, strict=True):
        for name, counts in r[kind].items():
            if width.setdefault(name, len(counts)) != len(counts):
                raise GateInputError(
                    f"device {s.device_id}: field '{kind}.{name}' has {len(counts)} bins,"
                    f" others {width[name]}"
                )
    out = {name: np.zeros((len(rows), w)) for name, w in width.items()}
    for i, (s, r) in enumerate(zip(samples, rows, strict=True)):
        for name, counts in r[kind].items():
            out[name][i] = [_count(c, s.device_id, f"{kind}.{name}") for c in counts]
    return out
