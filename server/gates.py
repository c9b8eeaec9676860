"""Rollout gates: per-device samples of a treatment and a control arm and a config in, a verdict
per gate with its figures out. Pure (no I/O, no database, no clock); Kayenta's judge is the model.
The config is :mod:`server.gate_config`; the samples and their columns, :mod:`server.gate_samples`.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import optimize, special

from server.gate_config import MIN_DEVICES_FLOOR, RATE_GATES, GateConfig, GateInputError
from server.gate_samples import ArmData, DeviceSample, Metric, arm_data

Status = Literal["pass", "fail", "hold", "no-data"]
Decision = Literal["advance-ok", "fail", "hold"]

#: Shares below this count as this in divergences (an empty bin would make PSI infinite).
SHARE_FLOOR = 1e-4


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
        if name in RATE_GATES:
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
    return proportion_gate(
        "install",
        failures,
        n,
        "failed",
        threshold=spec.max_failure_rate,
        alpha=alpha,
        harm_above=True,
        devices=n,
        inferences=base.treatment_inferences,
        prior=(1.0, 19.0),
    )


def proportion_gate(
    name: str,
    hits: int,
    n: int,
    what: str,
    *,
    threshold: float,
    alpha: float,
    harm_above: bool,
    devices: int,
    inferences: int,
    prior: tuple[float, float] = (1.0, 1.0),
) -> GateResult:
    """A treatment-only gate on the share ``hits / n`` (``what``: "failed", "agreed"), decided on
    its confidence sequence against ``threshold``. With ``harm_above`` (a failure rate) it fails
    when the lower bound is above the threshold and passes when the upper bound is below it;
    otherwise (an agreement) it fails when the upper bound is below and passes when the lower
    bound reaches it; else it holds."""
    lo, hi = beta_binomial_cs(hits, n, alpha, prior)
    share = hits / n
    figures = f"{hits}/{n} {what} ({share:.3g}, sequence {lo:.3g}..{hi:.3g})"
    worse, better = ("above", "below") if harm_above else ("below", "at or above")
    failed = lo > threshold if harm_above else hi < threshold
    passed = hi < threshold if harm_above else lo >= threshold
    status: Status
    if failed:
        status, reason = "fail", f"{name}: {figures} {worse} {threshold:.3g}"
    elif passed:
        status, reason = "pass", f"{figures}: {better} {threshold:.3g}"
    else:
        status, reason = "hold", f"not yet conclusive: {figures}"
    return GateResult(
        name,
        status,
        reason,
        threshold,
        alpha,
        estimate=share,
        lower=lo,
        upper=hi,
        treatment_value=share,
        treatment_devices=devices,
        treatment_inferences=inferences,
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
