"""Rollout gates on simulated fleets: false halts, detection and days to detection, against a
Flagger-style fixed-threshold check on the same traces.

    PYTHONPATH=. python bench/bench_gates.py [--quick] [--seed N] [--no-baseline]

Each rollout simulates a fleet per device per day as aggregates (the issue's settings, printed
first): daily inferences, errors, self-test failures, negative feedback, a latency histogram on the
latency sketch's 1% log buckets (around each device's own scale), output class counts, three input
histograms, labels. Every device-day is one upload that arrives 0-14 days late; every 6 simulated
hours the gates see only what has arrived, through :func:`server.gates.judge_arms` (the columns
:func:`server.gate_samples.arm_data` builds from samples; building dicts for 2,000 devices each
look would only slow the run). Histogram counts are Poisson per bucket (a multinomial's fast
equivalent). The pre-rollout week on the previous version gives each device's baseline (CUPED);
--no-baseline drops it. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from server import gates

DEVICES = 2000
STAGE_SHARE = 0.10
MEAN_DAILY_INFERENCES, INFERENCE_SHAPE = 200.0, 2.0
ERROR_MEAN, ERROR_CONCENTRATION = 0.01, 50.0
UPLOAD_DELAY_MEAN_DAYS, UPLOAD_DELAY_MAX_DAYS = 2.0, 14.0
MIN_DURATION_DAYS, LABEL_MIN_DURATION_DAYS = 3, 7
LABEL_DELAY_DAYS = 7
EVALUATION_EVERY_DAYS = 0.25
PRE_DAYS = 7  # the previous version's week before the rollout (the baseline)
# Other simulated traits (not fixed by the issue).
LATENCY_S, LATENCY_DEVICE_SD, LATENCY_WITHIN_SD = 0.05, 0.25, 0.35
FEEDBACK_MEAN, SELFTEST_PER_WINDOW, WINDOWS_PER_DAY = 0.005, 0.002, 24
INSTALL_FAILURE = 0.005
ACCURACY_MEAN, ACCURACY_CONCENTRATION, LABELLED_SHARE = 0.90, 50.0, 0.10
OUTPUT_BASE = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
OUTPUT_CONCENTRATION, INPUT_CONCENTRATION = 100.0, 200.0
INPUT_FEATURES, INPUT_BINS = 3, 12
# Regressions, as the issue states them.
LATENCY_FACTOR, ERROR_POINTS, ACCURACY_POINTS, JS_BITS, PSI_SHIFT = 1.20, 0.005, 0.03, 0.05, 0.2
SCENARIOS = {  # name -> (gate that must fail, stage minimum duration)
    "A/A": (None, MIN_DURATION_DAYS),
    "p95 latency +20%": ("latency", MIN_DURATION_DAYS),
    "error rate +0.5 pt": ("error_rate", MIN_DURATION_DAYS),
    "accuracy -3 pt": ("accuracy", LABEL_MIN_DURATION_DAYS),
    "output JS +0.05 bit": ("output_shift", MIN_DURATION_DAYS),
    "input PSI +0.2": ("input_drift", MIN_DURATION_DAYS),
}
LOG_GAMMA = math.log(1.01 / 0.99)  # the sketch's bucket width at 1% relative accuracy
Z_EDGES = np.arange(0.9, 2.95, LOG_GAMMA / LATENCY_WITHIN_SD)  # where a p95 can fall
Z_MID = np.r_[Z_EDGES[0], (Z_EDGES[:-1] + Z_EDGES[1:]) / 2, Z_EDGES[-1]]
Z_PROB = np.diff(np.r_[0.0, stats.norm.cdf(Z_EDGES), 1.0])


def _input_base() -> np.ndarray:
    edges = np.linspace(-2.5, 2.5, INPUT_BINS - 1)
    return np.diff(np.r_[0.0, stats.norm.cdf(edges), 1.0])


INPUT_BASE = _input_base()


def _mix_for(target: float, base: np.ndarray, other: np.ndarray, divergence) -> float:  # type: ignore[no-untyped-def]
    """The mixing weight toward ``other`` at which ``divergence(mix, base)`` reaches ``target``."""
    return float(
        optimize.brentq(
            lambda lam: divergence((1 - lam) * base + lam * other, base) - target, 1e-9, 1.0
        )
    )


OUTPUT_OTHER = OUTPUT_BASE[::-1].copy()
OUTPUT_MIX = _mix_for(JS_BITS, OUTPUT_BASE, OUTPUT_OTHER, gates.js_bits)
INPUT_OTHER = np.roll(INPUT_BASE, 2)
INPUT_MIX = _mix_for(PSI_SHIFT, INPUT_BASE, INPUT_OTHER, gates.psi)


@dataclass
class Trace:
    """One simulated rollout: per device (rows) and day (columns; the first PRE_DAYS before it)."""

    treated: np.ndarray
    inferences: np.ndarray
    errors: np.ndarray
    selftest: np.ndarray
    negative: np.ndarray
    labelled: np.ndarray
    correct: np.ndarray
    latency: np.ndarray  # (device, day, z bucket)
    latency_value: np.ndarray  # (device, day, z bucket): log latency each bucket stands for
    outputs: np.ndarray  # (device, day, class)
    inputs: np.ndarray  # (device, day, feature, bin)
    arrival: np.ndarray  # days since stage start
    label_arrival: np.ndarray
    install_failed: np.ndarray


def simulate(
    rng: np.random.Generator, scenario: str, days: int, treated_count: int | None
) -> Trace:
    n, total = DEVICES, PRE_DAYS + days
    if treated_count is None:
        treated = rng.random(n) < STAGE_SHARE
    else:
        treated = np.zeros(n, bool)
        treated[rng.choice(n, treated_count, replace=False)] = True
    on_new = treated[:, None] & (np.arange(total) >= PRE_DAYS)[None, :]  # (n, total)
    daily = rng.gamma(INFERENCE_SHAPE, MEAN_DAILY_INFERENCES / INFERENCE_SHAPE, n)
    inferences = rng.poisson(daily[:, None], (n, total))
    p_err = rng.beta(ERROR_MEAN * ERROR_CONCENTRATION, (1 - ERROR_MEAN) * ERROR_CONCENTRATION, n)
    p_err = np.broadcast_to(p_err[:, None], (n, total)).copy()
    if scenario == "error rate +0.5 pt":
        p_err[on_new] += ERROR_POINTS
    errors = rng.binomial(inferences, np.minimum(p_err, 1.0))
    selftest = rng.binomial(WINDOWS_PER_DAY, SELFTEST_PER_WINDOW, (n, total))
    p_neg = rng.beta(FEEDBACK_MEAN * 50, (1 - FEEDBACK_MEAN) * 50, n)
    negative = rng.binomial(inferences, p_neg[:, None])
    labelled = rng.binomial(inferences, LABELLED_SHARE)
    acc = rng.beta(
        ACCURACY_MEAN * ACCURACY_CONCENTRATION, (1 - ACCURACY_MEAN) * ACCURACY_CONCENTRATION, n
    )
    acc = np.broadcast_to(acc[:, None], (n, total)).copy()
    if scenario == "accuracy -3 pt":
        acc[on_new] -= ACCURACY_POINTS
    correct = rng.binomial(labelled, np.clip(acc, 0, 1))
    mu = math.log(LATENCY_S) + rng.normal(0, LATENCY_DEVICE_SD, n)
    shift = np.where(on_new, math.log(LATENCY_FACTOR), 0.0) if scenario.startswith("p95") else 0.0
    loc = mu[:, None] + shift  # (n, total)
    latency = rng.poisson(inferences[:, :, None] * Z_PROB)
    latency_value = loc[:, :, None] + LATENCY_WITHIN_SD * Z_MID
    p_out = rng.dirichlet(OUTPUT_CONCENTRATION * OUTPUT_BASE, n)[:, None, :].repeat(total, 1)
    if scenario == "output JS +0.05 bit":
        p_out[on_new] = (1 - OUTPUT_MIX) * p_out[on_new] + OUTPUT_MIX * OUTPUT_OTHER
    outputs = rng.poisson(inferences[:, :, None] * p_out)
    p_in = rng.dirichlet(INPUT_CONCENTRATION * INPUT_BASE, (n, INPUT_FEATURES))
    p_in = p_in[:, None].repeat(total, 1)  # (n, total, feature, bin)
    if scenario == "input PSI +0.2":
        p_in[on_new, 0] = (1 - INPUT_MIX) * p_in[on_new, 0] + INPUT_MIX * INPUT_OTHER
    inputs = rng.poisson(inferences[:, :, None, None] * p_in)
    day_end = (np.arange(total) - PRE_DAYS + 1)[None, :]
    delay = np.minimum(rng.exponential(UPLOAD_DELAY_MEAN_DAYS, (n, total)), UPLOAD_DELAY_MAX_DAYS)
    arrival = day_end + delay
    label_delay = np.minimum(
        rng.exponential(UPLOAD_DELAY_MEAN_DAYS, (n, total)), UPLOAD_DELAY_MAX_DAYS
    )
    label_arrival = day_end + LABEL_DELAY_DAYS + label_delay
    install_failed = (rng.random(n) < INSTALL_FAILURE).astype(float)
    return Trace(
        treated,
        inferences,
        errors,
        selftest,
        negative,
        labelled,
        correct,
        latency,
        latency_value,
        outputs,
        inputs,
        arrival,
        label_arrival,
        install_failed,
    )


def _p95_log(
    hist: np.ndarray, values: np.ndarray, q: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Per device: the log latency at rank ``q (n - 1)`` of its histogram (as the sketch reads
    it), and ``n``. ``values`` is the bucket's log latency per device."""
    count = hist.sum(axis=1)
    rank = q * np.maximum(count - 1, 0)
    idx = (np.cumsum(hist, axis=1) > rank[:, None]).argmax(axis=1)
    return values[np.arange(len(idx)), idx], count


class Rollout:
    """What has arrived by each look, per device, as running totals (computed once per trace)."""

    def __init__(self, trace: Trace, use_baseline: bool, looks: int) -> None:
        self.t = trace
        self.use_baseline = use_baseline
        # The look at which each device-day (and its labels) has arrived; past the last: never.
        at = np.ceil(trace.arrival / EVALUATION_EVERY_DAYS).astype(int) - 1
        label_at = np.ceil(trace.label_arrival / EVALUATION_EVERY_DAYS).astype(int) - 1
        self.at, self.label_at = np.clip(at, 0, looks), np.clip(label_at, 0, looks)
        self.looks = looks
        stage = np.arange(trace.arrival.shape[1]) >= PRE_DAYS
        self.days_cur = self._cum(
            np.broadcast_to(stage, trace.arrival.shape).astype(int), self.at, stage
        )
        self.last_cur = self._last(stage)
        self.cur = {
            name: self._cum(getattr(trace, name), self.at, stage)
            for name in (
                "inferences",
                "errors",
                "selftest",
                "negative",
                "latency",
                "outputs",
                "inputs",
            )
        }
        self.cur.update(
            {
                name: self._cum(getattr(trace, name), self.label_at, stage)
                for name in ("labelled", "correct")
            }
        )
        pre = ~stage
        if use_baseline:
            self.pre = {
                name: self._cum(getattr(trace, name), self.at, pre)
                for name in ("inferences", "errors", "selftest", "negative", "latency")
            }
            self.pre.update(
                {
                    name: self._cum(getattr(trace, name), self.label_at, pre)
                    for name in ("labelled", "correct")
                }
            )
            self.pre["days"] = self._cum(
                np.broadcast_to(pre, trace.arrival.shape).astype(int), self.at, pre
            )

    def _cum(self, x: np.ndarray, at: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Totals of ``x`` over ``days`` arrived by each look: (look, device, ...)."""
        n = x.shape[0]
        out = np.zeros((self.looks + 1, *x.shape[:1], *x.shape[2:]), dtype=np.int64)
        rows = np.arange(n)
        for d in np.nonzero(days)[0]:
            out[at[:, d], rows] += x[:, d]  # one device once per day: no repeated index
        return np.cumsum(out[:-1], axis=0)

    def _last(self, stage: np.ndarray) -> np.ndarray:
        """Per look and device: the highest stage day arrived plus one (sequence-number style)."""
        last = np.zeros((self.looks + 1, self.at.shape[0]), dtype=np.int64)
        rows = np.arange(self.at.shape[0])
        for d in np.nonzero(stage)[0]:
            idx = self.at[:, d]
            last[idx, rows] = np.maximum(last[idx, rows], d - PRE_DAYS + 1)
        return np.maximum.accumulate(last[:-1], axis=0)

    def arms(self, look: int) -> tuple[gates.ArmData, gates.ArmData, dict[str, list[float]]]:
        t, c = self.t, {k: v[look] for k, v in self.cur.items()}
        inf = c["inferences"]
        windows = WINDOWS_PER_DAY * self.days_cur[look]
        value = t.latency_value[:, -1, :]  # on stage days each device's scale is fixed
        p95, n_lat = _p95_log(c["latency"], value)
        nan = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            vals = {
                "error_rate": (c["errors"] / inf, inf),
                "selftest": (c["selftest"] / windows, windows),
                "feedback": (c["negative"] / inf, inf),
                "accuracy": (c["correct"] / c["labelled"], c["labelled"]),
                "latency": (np.where(n_lat >= 20, p95, nan), n_lat),
            }
            base: dict[str, np.ndarray] = {}
            if self.use_baseline:
                b = {k: v[look] for k, v in self.pre.items()}
                pp95, pn = _p95_log(b["latency"], t.latency_value[:, 0, :])
                base = {
                    "error_rate": b["errors"] / b["inferences"],
                    "selftest": b["selftest"] / (WINDOWS_PER_DAY * b["days"]),
                    "feedback": b["negative"] / b["inferences"],
                    "accuracy": b["correct"] / b["labelled"],
                    "latency": np.where(pn >= 20, pp95, nan),
                }
        days_seen = self.days_cur[look]
        first_in = self.at[:, PRE_DAYS] <= look
        arms = []
        for treated in (True, False):
            arm = t.treated if treated else ~t.treated
            metrics = {
                name: gates.Metric(
                    np.where(count[arm] > 0, v[arm], nan).astype(float),
                    count[arm].astype(float),
                    base[name][arm].astype(float) if name in base else None,
                )
                for name, (v, count) in vals.items()
            }
            install = (
                np.where(first_in[arm], t.install_failed[arm], nan)
                if treated
                else (np.full(int(arm.sum()), nan))
            )
            arms.append(
                gates.ArmData(
                    devices=int(arm.sum()),
                    inferences=inf[arm].astype(float),
                    metrics=metrics,
                    outputs={"class": c["outputs"][arm]},
                    inputs={f"x{f}": c["inputs"][arm][:, f, :] for f in range(INPUT_FEATURES)},
                    install_failed=install,
                    batches_received=int(days_seen[arm].sum()),
                    batches_expected=int(self.last_cur[look][arm].sum()),
                )
            )
        pooled = {"p95": [_pooled_p95(c["latency"][a], value[a]) for a in (t.treated, ~t.treated)]}
        return arms[0], arms[1], pooled


def _pooled_p95(hist: np.ndarray, value: np.ndarray) -> float:
    """The arm's p95 from its merged histogram (buckets of the sketch's width)."""
    keys = np.round(value / LOG_GAMMA).astype(int).ravel()
    low = keys.min()
    merged = np.bincount(keys - low, weights=hist.ravel())
    cum = np.cumsum(merged)
    if cum[-1] == 0:
        return float("nan")
    return float(
        np.exp((np.searchsorted(cum, 0.95 * (cum[-1] - 1), side="right") + low) * LOG_GAMMA)
    )


def flagger_fails(
    tr: gates.ArmData, co: gates.ArmData, pooled: dict[str, list[float]], cfg: gates.GateConfig
) -> bool:
    """Flagger-style: pooled treatment figures against control with the same thresholds, no
    statistics, no minimum evidence (a check with no data at all is skipped)."""

    def rate(arm: gates.ArmData, name: str) -> float:
        m = arm.metrics[name]
        ok = ~np.isnan(m.values)
        return (
            float((m.values[ok] * m.counts[ok]).sum() / m.counts[ok].sum())
            if ok.any()
            else math.nan
        )

    checks = [
        rate(tr, "error_rate") - rate(co, "error_rate") > cfg.error_rate.max_increase,
        rate(tr, "selftest") - rate(co, "selftest") > cfg.selftest.max_increase,
        rate(tr, "feedback") - rate(co, "feedback") > cfg.feedback.max_increase,
        rate(co, "accuracy") - rate(tr, "accuracy") > cfg.accuracy.max_drop,
        pooled["p95"][0] / pooled["p95"][1] - 1 > cfg.latency.max_relative_increase,
    ]
    out_t, out_c = tr.outputs["class"].sum(0), co.outputs["class"].sum(0)
    if out_t.sum() and out_c.sum():
        checks.append(
            gates.js_bits(out_t / out_t.sum(), out_c / out_c.sum()) > cfg.output_shift.max_js_bits
        )
    for name in tr.inputs:
        a, b = tr.inputs[name].sum(0), co.inputs[name].sum(0)
        if a.sum() and b.sum():
            checks.append(gates.psi(a / a.sum(), b / b.sum()) > cfg.input_drift.max_psi)
    known = tr.install_failed[~np.isnan(tr.install_failed)]
    if len(known):
        checks.append(known.mean() > cfg.install.max_failure_rate)
    return any(bool(c) for c in checks)  # NaN comparisons are False: no data, no check


@dataclass
class Outcome:
    ours_fail_day: float  # inf: never
    ours_gates: tuple[str, ...]
    flagger_fail_day: float
    advanced_day: float  # first advance-ok at or after the minimum duration (inf: never)


def run_rollout(
    seed: int,
    scenario: str,
    cfg: gates.GateConfig,
    use_baseline: bool,
    treated_count: int | None = None,
) -> Outcome:
    _, min_days = SCENARIOS[scenario]
    horizon = 3 * min_days
    rng = np.random.default_rng(seed)
    trace = simulate(rng, scenario, horizon, treated_count)
    looks = int(horizon / EVALUATION_EVERY_DAYS)
    roll = Rollout(trace, use_baseline, looks)
    share = STAGE_SHARE if treated_count is None else treated_count / DEVICES
    ours = flag = advanced = math.inf
    failed: tuple[str, ...] = ()
    stop_at_detection = scenario != "A/A"
    for look in range(looks):
        now = (look + 1) * EVALUATION_EVERY_DAYS
        tr, co, pooled = roll.arms(look)
        if ours == math.inf:
            verdict = gates.judge_arms(tr, co, cfg, expected_treatment_share=share)
            if verdict.decision == "fail":
                ours, failed = now, verdict.failed
            elif verdict.decision == "advance-ok" and now >= min_days and advanced == math.inf:
                advanced = now
        if flag == math.inf and flagger_fails(tr, co, pooled, cfg):
            flag = now
        if stop_at_detection and ours < math.inf and flag < math.inf:
            break
    return Outcome(ours, failed, flag, advanced)


def _days(days: list[float], q: float) -> str:
    value = float(np.quantile(np.array(days), q, method="higher"))
    return "never" if value == math.inf else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 A/A and 10 of each regression")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="no pre-rollout covariate")
    args = parser.parse_args()
    aa_runs, runs, tiny_runs = (20, 10, 12) if args.quick else (200, 100, 60)
    cfg = gates.GateConfig()
    print(
        f"settings: {DEVICES} devices, {STAGE_SHARE:.0%} stage, daily inferences gamma(mean"
        f" {MEAN_DAILY_INFERENCES:.0f}, shape {INFERENCE_SHAPE:.0f}), error rate beta(mean"
        f" {ERROR_MEAN:.0%}, concentration {ERROR_CONCENTRATION:.0f}), uploads exponential(mean"
        f" {UPLOAD_DELAY_MEAN_DAYS:.0f} d) capped at {UPLOAD_DELAY_MAX_DAYS:.0f} d, min duration"
        f" {MIN_DURATION_DAYS} d ({LABEL_MIN_DURATION_DAYS} d with labels {LABEL_DELAY_DAYS} d"
        f" late), a look every {24 * EVALUATION_EVERY_DAYS:.0f} h, horizon 3 x min duration,"
        f" baseline week {'off' if args.no_baseline else 'on'}"
    )
    print(
        f"gates: alpha {cfg.alpha} over {len(cfg.enabled_gates())} gates; thresholds: error "
        f"+{cfg.error_rate.max_increase}, p95 +{cfg.latency.max_relative_increase:.0%}, accuracy "
        f"-{cfg.accuracy.max_drop}, JS {cfg.output_shift.max_js_bits} bit, PSI "
        f"{cfg.input_drift.max_psi}; Flagger-style: same thresholds on pooled figures, halt "
        "at the first look that crosses one"
    )
    started = time.perf_counter()
    rows = []
    for k, (scenario, (gate, min_days)) in enumerate(SCENARIOS.items()):
        count = aa_runs if gate is None else runs
        outs = [
            run_rollout(args.seed * 100_000 + k * 10_000 + i, scenario, cfg, not args.no_baseline)
            for i in range(count)
        ]
        horizon = 3 * min_days
        ours = [o.ours_fail_day for o in outs]
        right = sum(gate in o.ours_gates for o in outs) if gate else 0
        flag = [o.flagger_fail_day for o in outs]
        rows.append((scenario, count, horizon, ours, right, flag, outs))
        print(f"  ... {scenario} done at {time.perf_counter() - started:.0f} s", flush=True)
    tiny = []
    names = list(SCENARIOS)
    for i in range(tiny_runs):
        scenario = names[i % len(names)]
        tiny.append(
            (
                scenario,
                run_rollout(
                    args.seed * 100_000 + 90_000 + i,
                    scenario,
                    cfg,
                    not args.no_baseline,
                    treated_count=3,
                ),
            )
        )
    elapsed = time.perf_counter() - started
    print()
    header = (
        f"{'scenario':<22}{'runs':>5}{'horizon d':>10} | {'ours: halted':>13}{'right gate':>11}"
        f"{'median d':>9}{'p90 d':>7} | {'Flagger: halted':>16}{'median d':>9}{'p90 d':>7}"
    )
    print(header)
    print("-" * len(header))
    for scenario, count, horizon, ours, right, flag, _outs in rows:
        hit = sum(d <= horizon for d in ours)
        fhit = sum(d <= horizon for d in flag)
        right_s = f"{right}/{count}" if scenario != "A/A" else "-"
        print(
            f"{scenario:<22}{count:>5}{horizon:>10} | {hit / count:>12.1%} {right_s:>10}"
            f"{_days(ours, 0.5):>9}{_days(ours, 0.9):>7} | {fhit / count:>15.1%}"
            f"{_days(flag, 0.5):>9}{_days(flag, 0.9):>7}"
        )
    aa = rows[0][6]
    by_min = sum(o.advanced_day <= MIN_DURATION_DAYS for o in aa)
    by_end = sum(o.advanced_day < math.inf for o in aa)
    print(
        f"\nA/A: advance-ok at the minimum duration ({MIN_DURATION_DAYS} d) in {by_min}/{len(aa)}"
        f", by the horizon in {by_end}/{len(aa)}; other outcomes were holds"
    )
    ours_tiny = sum(o.ours_fail_day < math.inf for _, o in tiny)
    flag_tiny = sum(o.flagger_fail_day < math.inf for _, o in tiny)
    print(
        f"3 treatment devices ({len(tiny)} rollouts, every scenario in turn): ours halted "
        f"{ours_tiny} (every look held), Flagger-style halted {flag_tiny}"
    )
    print(f"run time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
