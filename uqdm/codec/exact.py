"""Correctly rounded elementwise math for the codec's tables: `exp`, 2^(n/64) and the base CDFs.

Built from IEEE-754 basic operations only (+, −, ×, ÷ and a square-root table made once), which
are correctly rounded and therefore bit-identical on every device, thread count and tensor layout;
library `exp`, `sigmoid` or `erfc` kernels need not be (vectorised and scalar paths, and
devices, may differ in the last bit). Everything here is float64.
"""

import math

import torch
from torch import Tensor

# exp: x = (n/64)·ln 2 + r with |r| ≤ ln2/128, exp(r) by Taylor to degree 5 (error < 1e-16),
# 2^(n/64) = 2^(n mod 64 / 64)·2^⌊n/64⌋ from a 64-entry table and the float's exponent bits.
EXP2_BITS = 6
LN2_HI = 6.93147180369123816490e-01 / (1 << EXP2_BITS)  # ln2/64 to 32 significant bits: n·LN2_HI is exact
LN2_LO = 1.90821492927058770002e-10 / (1 << EXP2_BITS)  # ln2/64 − LN2_HI
INV_LN2 = 1.44269504088896338700e00 * (1 << EXP2_BITS)
EXP_LIMIT = 700.0
TAYLOR = [1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120]


def _exp2_fractions(bits: int) -> list[float]:
    """2^(i/2^bits), i < 2^bits, as products of 2^(2^-k) from repeated (correctly rounded) square roots."""
    roots, r = [], 2.0
    for _ in range(bits):
        r = math.sqrt(r)
        roots.append(r)  # roots[k] = 2^(2^-(k+1))
    table = []
    for i in range(1 << bits):
        v = 1.0
        for k in range(bits):
            if (i >> (bits - 1 - k)) & 1:
                v *= roots[k]
        table.append(v)
    return table


EXP2_TABLE = torch.tensor(_exp2_fractions(EXP2_BITS), dtype=torch.float64)

# Abramowitz & Stegun 7.1.26: erfc(x) ≈ t·Σ a_k t^k·exp(−x²), t = 1/(1 + p·x), x ≥ 0 (|error| < 1.5e-7).
ERFC_P = 0.3275911
ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def pow2(n: Tensor) -> Tensor:
    """2^(n/64) for int64 n with |n/64| ≤ 1022: a table entry times a power of two built from its bits."""
    whole = ((n >> EXP2_BITS) + 1023) << 52
    return EXP2_TABLE[n & ((1 << EXP2_BITS) - 1)] * whole.view(torch.float64)


def det_exp(x: Tensor) -> Tensor:
    """exp(x) for float64 `x` (clipped to ±700) from correctly rounded basic operations only."""
    x = x.clamp(-EXP_LIMIT, EXP_LIMIT)
    n = torch.round(x * INV_LN2)
    r = x.sub_(n * LN2_HI).sub_(n * LN2_LO)
    p = torch.full_like(r, TAYLOR[-1])
    for c in reversed(TAYLOR[:-1]):
        p = p.mul_(r).add_(c)
    return p.mul_(pow2(n.to(torch.int64)))


def det_cdf(prior_type: str, x: Tensor) -> Tensor:
    """F(x) of the standard base density: logistic 1/(1 + e^−x), or Φ(x) = ½·erfc(−x/√2)."""
    if prior_type == "logistic":
        return 1.0 / (1.0 + det_exp(-x))
    z = x.abs() * (1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + ERFC_P * z)
    poly = torch.full_like(t, ERFC_A[-1])
    for a in reversed(ERFC_A[:-1]):
        poly = poly.mul_(t).add_(a)
    half_erfc = 0.5 * (poly * t) * det_exp(-(z * z))
    return torch.where(x < 0, half_erfc, 1.0 - half_erfc)

