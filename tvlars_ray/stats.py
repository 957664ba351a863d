"""Seed statistics: means with Student-t intervals, and paired differences in words.

A handful of seeds is what a grid can afford, so an interval must use the t distribution of
the sample, not the normal one: with 3 seeds the 95% quantile is 4.30, not 1.96. scipy is not
a dependency for one function; the quantile comes from the t distribution's CDF, written with
the regularized incomplete beta function (a continued fraction, as in Numerical Recipes), and
bisection. Everything here is plain Python on plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A sample's mean, its sample standard deviation (ddof 1), n, and the half-width of the
    two-sided Student-t interval for the mean (NaN below two values)."""

    mean: float
    std: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std and the t interval of the finite ``values`` (NaNs are dropped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, half, n)


def verdict(diff: Interval, first: str, second: str, scale: float = 100.0) -> str:
    """A paired difference ``first - second`` in one plain sentence, in points (x ``scale``).

    "ahead by / behind by" only when the interval excludes zero; otherwise "no difference
    detectable", with the estimate beside it so a reader sees how wide the doubt is.
    """
    if diff.n == 0:
        return f"{first} vs {second}: no seed where both finished"
    seeds = f"{diff.n} seed{'s' if diff.n != 1 else ''}"
    mean = scale * diff.mean
    if diff.n == 1:
        return f"{first} vs {second}: {mean:+.2f} points on 1 seed (no interval from one seed)"
    half = scale * diff.half
    if diff.excludes_zero:
        word = "ahead of" if diff.mean > 0 else "behind"
        return f"{first} {word} {second} by {abs(mean):.2f} ± {half:.2f} points over {seeds}"
    return (f"{first} vs {second}: no difference detectable over {seeds} "
            f"({mean:+.2f} ± {half:.2f} points)")
