import math

import pytest

from tvlars_ray.stats import incomplete_beta, interval, t_cdf, t_quantile, verdict

# Two-sided 95% critical values of Student's t (the 0.975 quantile), from the published table
# (e.g. NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 19: 2.093,
         29: 2.045, 60: 2.000, 100: 1.984}
# Other columns of the same table.
T_OTHER = [(0.995, 5, 4.032), (0.99, 10, 2.764), (0.95, 3, 2.353), (0.90, 20, 1.325)]


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_published_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=5e-4)


@pytest.mark.parametrize("p, df, value", T_OTHER)
def test_other_quantiles_and_symmetry(p, df, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-value, abs=5e-4)


def test_cdf_known_values():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-1.0, 1) == pytest.approx(0.25)
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(2 + 4)), abs=1e-12)
    assert t_cdf(1.96, 1e7) == pytest.approx(0.9750021, abs=1e-6)  # the normal limit
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_interval_uses_the_sample_std_and_t():
    iv = interval([0.60, 0.62, 0.61])
    assert iv.n == 3 and iv.mean == pytest.approx(0.61)
    assert iv.std == pytest.approx(0.01)  # ddof 1; the population std would be 0.00816
    assert iv.half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    assert (iv.low, iv.high) == pytest.approx((0.61 - iv.half, 0.61 + iv.half))
    one = interval([0.5, float("nan"), None])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.half)
    assert interval([]).n == 0


def test_verdicts_in_words():
    ahead = interval([0.012, 0.008, 0.016])
    assert verdict(ahead, "TVLARS", "LARS") == (
        f"TVLARS ahead of LARS by 1.20 ± {100 * ahead.half:.2f} points over 3 seeds")
    behind = interval([-0.05, -0.055, -0.06])
    assert verdict(behind, "TVLARS", "LAMB") == (
        "TVLARS behind LAMB by 5.50 ± 1.24 points over 3 seeds")
    unsure = interval([0.01, -0.02, 0.015])
    assert verdict(unsure, "TVLARS", "LARS").startswith(
        "TVLARS vs LARS: no difference detectable over 3 seeds (")
    assert "1 seed" in verdict(interval([0.01]), "A", "B")
    assert "no seed where both finished" in verdict(interval([]), "A", "B")
