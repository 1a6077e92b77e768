"""The benchmarks' confidence interval of a per-draw ratio against scipy's t distribution."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from draw_stats import ratio_interval, t975  # noqa: E402


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df
    assert t975(200) == pytest.approx(stats.norm.ppf(0.975), abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interval_matches_scipy_on_the_log_scale(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    ratios = [math.exp(rng.gauss(0.01, 0.02)) for _ in range(n)]
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / n
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(logs))
    geo, low, high = ratio_interval(ratios)
    # the table holds t to 3 decimals: the bounds agree to that relative precision of the half width
    half = (hi - lo) / 2
    assert math.log(geo) == pytest.approx(mean, abs=1e-12)
    assert math.log(low) == pytest.approx(lo, abs=1e-3 * half + 1e-12)
    assert math.log(high) == pytest.approx(hi, abs=1e-3 * half + 1e-12)
    # swapping the two sides inverts the interval
    inv = ratio_interval([1 / r for r in ratios])
    assert inv[0] == pytest.approx(1 / geo) and inv[1] == pytest.approx(1 / high)


def test_interval_rejects_too_few_or_bad_draws():
    with pytest.raises(ValueError, match="at least 2 draws"):
        ratio_interval([1.0])
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, 0.0])
