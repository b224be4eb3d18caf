"""Statistics over student seeds: the seed list, mean ± sample sd, paired t-intervals.

The demo's and the ablation's students differ from run to run by a few hundredths of AP50
(batch order, random initialisation of what ``init_from`` does not copy), as much as the
differences between loss variants. Every figure is therefore reported over K student seeds:

- :func:`student_seeds`: the K seeds, the config's ``student.train.seed`` first, then a fixed
  list (:data:`SEED_LIST`), so that K = 1 is the single-seed run and K = 3 extends it;
- :func:`summarize`: ``n``, mean, sample standard deviation (``ddof = 1``) and the values;
- :func:`paired_difference`: per-seed differences ``a_i − b_i`` of two variants trained with the
  same seeds, their mean, sd and a two-sided t-interval
  ``mean ± t_{1−α/2, n−1} · sd / √n`` (:func:`t_quantile`, from ``scipy.stats``);
- :func:`fmt_mean_sd`, :func:`fmt_interval`: the text used by the tables.

A value is *missing* when it is ``None`` or negative (COCO evaluation's −1 for a subset without
ground truth); a summary or a difference with a missing value has ``mean = None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "SEED_LIST",
    "fmt_interval",
    "fmt_mean_sd",
    "paired_difference",
    "student_seeds",
    "summarize",
    "t_quantile",
]

#: Student seeds after the config's own (``student.train.seed``, 42 by default), in order.
SEED_LIST: tuple[int, ...] = (42, 7, 123, 2024, 11, 99, 314, 1000, 555, 8)


def student_seeds(k: int, first: int = 42) -> list[int]:
    """The ``k`` student seeds: ``first`` (the config's seed), then :data:`SEED_LIST` without it.

    Raises:
        ValueError: ``k`` below 1 or above ``len(SEED_LIST)``.
    """
    if not 1 <= k <= len(SEED_LIST):
        raise ValueError(f"seeds: expected 1 to {len(SEED_LIST)} student seeds, got {k}")
    return [first, *(s for s in SEED_LIST if s != first)][:k]


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile ``t_{(1+level)/2, df}`` (2.776 for df = 4 at 95 %)."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"t_quantile: level must be in (0, 1), got {level}")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2.0, df))


def _clean(values: Sequence[float | None]) -> list[float] | None:
    """The values as floats, or ``None`` when one is missing (``None`` or negative)."""
    if any(v is None or v < 0 for v in values):
        return None
    return [float(v) for v in values]  # type: ignore[arg-type]


def _mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values)."""
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"n", "mean", "sd", "values"}`` of per-seed ``values`` (``sd`` = sample sd, ddof 1).

    ``sd`` is ``None`` for one value; ``mean`` and ``sd`` are ``None`` when a value is missing
    or there is none.
    """
    xs = _clean(values)
    if not xs:
        return {"n": len(values), "mean": None, "sd": None, "values": list(values)}
    mean, sd = _mean_sd(xs)
    return {"n": len(xs), "mean": mean, "sd": sd, "values": xs}


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95
) -> dict[str, Any]:
    """Per-seed differences ``a_i − b_i`` (same seeds, same order) and their t-interval.

    Returns ``{"n", "diffs", "mean", "sd", "df", "t", "level", "ci"}``: ``ci = [lo, hi] =
    mean ∓ t · sd / √n`` with ``t`` = :func:`t_quantile` ``(n − 1, level)``. With one seed
    ``sd``, ``t`` and ``ci`` are ``None``; with a missing value everything but ``n`` and
    ``diffs`` is.

    Raises:
        ValueError: ``a`` and ``b`` of different lengths (they must be paired by seed).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values; pair them by seed")
    xa, xb = _clean(a), _clean(b)
    out: dict[str, Any] = {
        "n": len(a),
        "diffs": None,
        "mean": None,
        "sd": None,
        "df": None,
        "t": None,
        "level": level,
        "ci": None,
    }
    if not xa or xb is None:
        return out
    diffs = [x - y for x, y in zip(xa, xb, strict=True)]
    mean, sd = _mean_sd(diffs)
    out.update(diffs=diffs, mean=mean, sd=sd)
    if sd is not None:
        n = len(diffs)
        t = t_quantile(n - 1, level)
        half = t * sd / math.sqrt(n)
        out.update(df=n - 1, t=t, ci=[mean - half, mean + half])
    return out


def fmt_mean_sd(summary: dict[str, Any] | None, digits: int = 3) -> str:
    """``"0.606 ± 0.012"``; ``"0.606"`` for one seed; ``"-"`` when missing."""
    if not summary or summary.get("mean") is None:
        return "-"
    text = f"{summary['mean']:.{digits}f}"
    if summary.get("sd") is not None:
        text += f" ± {summary['sd']:.{digits}f}"
    return text


def fmt_interval(diff: dict[str, Any] | None, digits: int = 3) -> str:
    """``"+0.014 [-0.010, +0.038]"`` (mean and t-interval); ``"+0.014"`` without one."""
    if not diff or diff.get("mean") is None:
        return "-"
    text = f"{diff['mean']:+.{digits}f}"
    if diff.get("ci") is not None:
        lo, hi = diff["ci"]
        text += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return text
