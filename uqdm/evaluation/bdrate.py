"""Bjøntegaard delta rate between two rate-distortion curves, piecewise-cubic variant.

Each curve's log-rate is interpolated as a function of PSNR with a monotone piecewise cubic
(PCHIP, the interpolation of the current JVET/AOM common test conditions rather than
Bjøntegaard's original cubic polynomial fit), and

    BD-rate = exp( (1 / (P_hi − P_lo)) · ∫_{P_lo}^{P_hi} (log R_test(P) − log R_anchor(P)) dP ) − 1

over the PSNR range [P_lo, P_hi] the two curves share, in percent: −10 means the test codec
needs 10% fewer bits than the anchor for the same quality.
"""

import math

import numpy as np
from scipy.interpolate import PchipInterpolator


def _log_rate_curve(rates, psnrs) -> tuple[np.ndarray, np.ndarray] | None:
    """(PSNR, log rate) of the curve's efficient points, sorted by PSNR; None if under 2 remain.

    Points with a non-positive rate or a non-finite PSNR are dropped, and so is any point that does
    not improve on the PSNR of every cheaper point (it is not on the curve's frontier).
    """
    usable = lambda r, p: r is not None and p is not None and r > 0 and math.isfinite(p)
    points = sorted((r, p) for r, p in zip(rates, psnrs) if usable(r, p))
    frontier: list[tuple[float, float]] = []
    for r, p in points:
        if not frontier or p > frontier[-1][1]:
            frontier.append((r, p))
    if len(frontier) < 2:
        return None
    r, p = np.array(frontier).T
    return p, np.log(r)


def bd_rate(anchor_rates, anchor_psnrs, test_rates, test_psnrs) -> float | None:
    """BD-rate of `test` against `anchor` in percent, or None where the curves share no PSNR range."""
    anchor, test = _log_rate_curve(anchor_rates, anchor_psnrs), _log_rate_curve(test_rates, test_psnrs)
    if anchor is None or test is None:
        return None
    lo, hi = max(anchor[0][0], test[0][0]), min(anchor[0][-1], test[0][-1])
    if hi <= lo:
        return None
    integral = lambda curve: PchipInterpolator(*curve).integrate(lo, hi)
    mean_log_ratio = (integral(test) - integral(anchor)) / (hi - lo)
    return float(100.0 * math.expm1(mean_log_ratio))
