"""Zero-centred base densities `g` of the prior, in log space, and their mass on an interval.

The UQDM prior is `g ⊛ Uniform(−Δ/2, Δ/2)`; its density times Δ at offset `x = z − μ_p` is the
mass of `g` on `[x − Δ/2, x + Δ/2]`, and the probability of the quantization index `k` under a
dither `u` is the mass on `[(k − u − ½)·Δ, (k − u + ½)·Δ]`. Both are `log_interval_mass`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PRIOR_TYPES = ("logistic", "normal")


class Logistic:
    """Logistic centred at 0 with scale `s = std·√3/π` (same std as N(0, std²)); G(x) = sigmoid(x/s)."""

    def __init__(self, std: Tensor):
        self.scale = std * (math.sqrt(3.0) / math.pi)

    def log_cdf(self, x: Tensor) -> Tensor:
        return F.logsigmoid(x / self.scale)


class Normal:
    """N(0, std²); log G(x) = log Φ(x/std)."""

    def __init__(self, std: Tensor):
        self.scale = std

    def log_cdf(self, x: Tensor) -> Tensor:
        return torch.special.log_ndtr(x / self.scale)


def base_distribution(prior_type: str, std: Tensor) -> Logistic | Normal:
    """The base density `g` of the prior with standard deviation `std`."""
    if prior_type == "logistic":
        return Logistic(std)
    if prior_type == "normal":
        return Normal(std)
    raise ValueError(f"unknown prior type {prior_type!r}; choose one of {PRIOR_TYPES}")


def log_sub_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) − exp(b)) for a ≥ b, as a + log(−expm1(b − a))."""
    return a + torch.log(-torch.expm1(b - a))


def log_interval_mass(g: Logistic | Normal, lo: Tensor, hi: Tensor) -> Tensor:
    """log(G(hi) − G(lo)) for a density symmetric about 0, stable in both tails.

    An interval right of 0 is mirrored to the left (G(hi) − G(lo) = G(−lo) − G(−hi)), so the
    subtraction always happens where G is small and log G is accurate.
    """
    right = (lo + hi) > 0
    lo, hi = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    return log_sub_exp(g.log_cdf(hi), g.log_cdf(lo))


def log_prob_uniform_convolved(g: Logistic | Normal, x: Tensor, delta: Tensor) -> Tensor:
    """log(p(z)·Δ) for p = g ⊛ Uniform(−Δ/2, Δ/2), at offsets `x = z − μ_p`."""
    return log_interval_mass(g, x - delta / 2, x + delta / 2)
