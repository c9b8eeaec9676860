"""Drift between two histograms on the same fixed bins: pure statistics, no I/O.

Devices count inputs and outputs on the bin edges that the manifest ships, so drift is computed
exactly from counts (no raw rows needed): the population stability index, the Jensen-Shannon
divergence in bits, Pearson's chi-square test of the 2 x k contingency table, and the largest
absolute difference of bin proportions. Every bin counts, under/overflow and unseen included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict
from scipy.stats import chi2 as chi2_distribution

#: A bin proportion of 0 is replaced by this before PSI's logarithm (and in its difference
#: factor), as is usual for PSI; stated in every answer.
PSI_ZERO_PROPORTION = 1e-4


class Drift(BaseModel):
    """Drift of ``current`` against ``baseline`` on one feature or output (the API's
    ``DriftRow`` adds the bins and counts).

    ``status`` is ``"ok"``, or ``"no-data"`` when either side has no counts (then every figure
    is None): no data is a result of its own, not a drift of zero.
    """

    model_config = ConfigDict(frozen=True)

    #: ``ok``, or ``no-data`` when a side has no counts (then the figures are None).
    status: str
    current_count: int
    baseline_count: int
    psi: float | None
    js_divergence_bits: float | None
    chi2: float | None
    chi2_dof: int | None
    chi2_p_value: float | None
    max_abs_proportion_diff: float | None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _proportions(counts: Sequence[int]) -> tuple[list[float], int]:
    total = sum(counts)
    return [c / total for c in counts], total


def psi(p: Sequence[float], q: Sequence[float]) -> float:
    """Population stability index of proportions ``p`` against ``q`` (natural logarithm)."""
    total = 0.0
    for a, b in zip(p, q, strict=True):
        a = a or PSI_ZERO_PROPORTION
        b = b or PSI_ZERO_PROPORTION
        total += (a - b) * math.log(a / b)
    return total


def js_divergence_bits(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (base 2, so within 0..1); 0 log 0 counts as 0."""
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(max(total, 0.0), 1.0)


def chi_square(current: Sequence[int], baseline: Sequence[int]) -> tuple[float, int, float]:
    """Pearson's chi-square test of independence on the 2 x k table of the two count vectors.

    Bins empty on both sides carry no information and are left out (their expected count is 0);
    no continuity correction. Returns the statistic, degrees of freedom and p-value; with fewer
    than two non-empty bins the two cannot differ (0, 0, 1).
    """
    columns = [(a, b) for a, b in zip(current, baseline, strict=True) if a or b]
    if len(columns) < 2:
        return 0.0, 0, 1.0
    n_a = sum(a for a, _ in columns)
    n_b = sum(b for _, b in columns)
    n = n_a + n_b
    statistic = 0.0
    for a, b in columns:
        column = a + b
        for observed, row in ((a, n_a), (b, n_b)):
            expected = row * column / n
            statistic += (observed - expected) ** 2 / expected
    dof = len(columns) - 1
    return statistic, dof, float(chi2_distribution.sf(statistic, dof))


def drift(current: Sequence[int], baseline: Sequence[int]) -> Drift:
    """Every drift figure of ``current`` counts against ``baseline`` counts on the same bins.

    Raises:
        ValueError: If the two have different numbers of bins or a negative count.
    """
    if len(current) != len(baseline):
        raise ValueError(f"bins differ: {len(current)} against {len(baseline)}")
    if any(c < 0 for c in current) or any(c < 0 for c in baseline):
        raise ValueError("counts must not be negative")
    n_current, n_baseline = sum(current), sum(baseline)
    if n_current == 0 or n_baseline == 0:
        # Every figure None: no data is not a drift of zero.
        known = {"status": "no-data", "current_count": n_current, "baseline_count": n_baseline}
        return Drift.model_validate(dict.fromkeys(Drift.model_fields) | known)
    p, _ = _proportions(current)
    q, _ = _proportions(baseline)
    statistic, dof, p_value = chi_square(current, baseline)
    return Drift(
        status="ok",
        current_count=n_current,
        baseline_count=n_baseline,
        psi=psi(p, q),
        js_divergence_bits=js_divergence_bits(p, q),
        chi2=statistic,
        chi2_dof=dof,
        chi2_p_value=p_value,
        max_abs_proportion_diff=max(abs(a - b) for a, b in zip(p, q, strict=True)),
    )
