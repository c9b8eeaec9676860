"""server.drift against a direct computation with numpy and scipy over raw values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency

from server.drift import PSI_ZERO_PROPORTION, drift

EDGES = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])


def _counts(values: np.ndarray) -> list[int]:
    """Counts on the manifest layout: under, [e0, e1), ..., over (at or above the last edge)."""
    index = np.searchsorted(EDGES, values, side="right")
    return np.bincount(index, minlength=len(EDGES) + 1).tolist()


def _direct(current: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    a, b = np.array(_counts(current), float), np.array(_counts(baseline), float)
    p, q = a / a.sum(), b / b.sum()
    pe, qe = np.where(p == 0, PSI_ZERO_PROPORTION, p), np.where(q == 0, PSI_ZERO_PROPORTION, q)
    keep = (a + b) > 0
    stat, p_value, dof, _ = chi2_contingency(np.vstack([a[keep], b[keep]]), correction=False)
    return {
        "psi": float(np.sum((pe - qe) * np.log(pe / qe))),
        "js_divergence_bits": float(jensenshannon(p, q, base=2) ** 2),
        "chi2": float(stat),
        "chi2_p_value": float(p_value),
        "chi2_dof": int(dof),
        "max_abs_proportion_diff": float(np.max(np.abs(p - q))),
    }


@pytest.mark.parametrize(
    ("shift", "scale", "n"),
    [(0.0, 1.0, 5000), (0.3, 1.0, 2000), (0.0, 2.5, 800), (1.5, 0.2, 300)],
    ids=["same", "shifted", "wider", "narrow-with-empty-bins"],
)
def test_figures_equal_a_direct_computation(shift: float, scale: float, n: int) -> None:
    rng = np.random.default_rng(7)
    baseline = rng.normal(0, 1, 10_000)
    current = rng.normal(shift, scale, n)
    got = drift(_counts(current), _counts(baseline)).to_dict()
    want = _direct(current, baseline)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-9, rel=1e-9), name
    assert 0 <= got["js_divergence_bits"] <= 1


def test_identical_distributions_show_no_drift() -> None:
    counts = [5, 10, 20, 20, 10, 5]
    d = drift(counts, [2 * c for c in counts])
    assert d.psi == pytest.approx(0) and d.js_divergence_bits == pytest.approx(0)
    assert d.chi2_p_value == pytest.approx(1) and d.max_abs_proportion_diff == pytest.approx(0)


def test_disjoint_distributions_are_one_bit_apart() -> None:
    d = drift([10, 0, 0], [0, 0, 7])
    assert d.js_divergence_bits == pytest.approx(1.0)
    assert d.max_abs_proportion_diff == pytest.approx(1.0)


def test_no_data_is_its_own_result() -> None:
    d = drift([0, 0, 0], [1, 2, 3])
    assert d.status == "no-data" and d.psi is None and d.current_count == 0


@pytest.mark.parametrize(
    ("current", "baseline", "message"),
    [([1, 2], [1, 2, 3], "bins differ"), ([1, -2, 3], [1, 2, 3], "negative")],
    ids=["bins", "negative"],
)
def test_bad_counts_are_refused(current: list[int], baseline: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drift(current, baseline)
