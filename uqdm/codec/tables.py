"""The entropy models of a `.uqdm` file's symbols: the probability tables of each step's index k
and of the lossless step's x_raw, and their ideal (unquantised) code lengths.

Encoder and decoder build every table with the same functions, `step_model` and `lossless_model`,
from inputs that are identical on both sides:

- the shared dither `u` (exact: see `randomness`),
- an integer index `j` of the prior's scale relative to Δ on the fixed table `2^(j/16)`,
- for the lossless step, `y = z_0/α_0` rounded to an integer multiple of `2^-12`.

Network outputs differ in their last bits between batch sizes, thread counts and devices (in
float64: ~1e-14 relative in the scale, ~1e-15 absolute in z_0); only the rounding of `j` and of
`y` sees them, which then lands on another value with probability ~1e-13 per step symbol and
~1e-12 per pixel of the lossless step. The tables themselves are computed with `exact`'s
correctly rounded arithmetic, so they are bit-identical everywhere; `coder` then quantises them
deterministically.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uqdm.distributions import base_distribution, log_interval_mass

from .exact import EXP2_BITS, det_cdf, det_exp, pow2

SCALE_STEPS = 16  # scale table entries per octave: a_j = 2^(j/16)
SCALE_INDEX_LIMIT = 20 * SCALE_STEPS  # a_j ∈ [2^-20, 2^20]
TAIL = {"logistic": 12.0, "normal": 4.5}  # tables reach ±TAIL·a_j (tail mass ≲ 1e-5 per side)
RANGES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # allowed half-widths R
GRID_BITS = 12  # y = z_0/α_0 is rounded to multiples of 2^-12
Y_LIMIT = 2  # ... after clipping to [−2, 2]
LOSSLESS_CUTOFF = 50.0  # lossless table entries below e^-50 (≪ 2^-24) are left at zero
TABLE_ENTRIES = 1 << 16  # float64 table entries built at once (512 KiB: the arithmetic stays in cache)
VOCAB_SIZE = 256


@dataclass
class Segment:
    """Symbols `index` coded in one call: value v is symbol v − low under the row's table.

    With an open-ended model, a row's first (last) symbol stands for every value below (above) it
    where `open[row, 0]` (`open[row, 1]`) is set, or always when `open` is None.
    """

    index: Tensor
    low: int
    table: np.ndarray  # (len(index), width) float64, rows need not sum to 1
    open: Tensor | None = None


def scale_index(scale: Tensor) -> Tensor:
    """j = round(16·log₂ a), clipped to ±20 octaves: the integer the tables are built from (int16)."""
    j = torch.round(SCALE_STEPS * torch.log2(scale.clamp_min(1e-300)))
    return j.clamp(-SCALE_INDEX_LIMIT, SCALE_INDEX_LIMIT).to(torch.int16)


def scale_value(j: Tensor) -> Tensor:
    """a_j = 2^(j/16)."""
    return pow2(j.long() * ((1 << EXP2_BITS) // SCALE_STEPS))


def half_width(j: Tensor, prior_type: str) -> Tensor:
    """R(j): the smallest entry of `RANGES` with R ≥ TAIL·a_j + 1 (int16)."""
    need = TAIL[prior_type] * scale_value(j) + 1
    ranges = torch.tensor(RANGES, dtype=torch.float64)
    pick = torch.searchsorted(ranges, need).clamp(max=len(RANGES) - 1)
    return torch.tensor(RANGES, dtype=torch.int16)[pick]


def _slices(index: Tensor, width: int) -> Iterator[Tensor]:
    per = max(1, TABLE_ENTRIES // width)
    yield from index.split(per)


class StepModel:
    """The discretised prior of one step: in units of Δ, k has mass F((k − u + ½)/a) − F((k − u − ½)/a).

    Values k ∈ [−R, R] are coded with a (2R + 1)-entry table whose end entries hold the whole
    tails (k ≤ −R, k ≥ R); an end symbol is followed by its excess |k| − R (see `encode`).
    Symbols are coded grouped by R (ascending), in index order within a group.
    """

    open_ends = True

    def __init__(self, u: Tensor, j: Tensor, prior_type: str, std: Tensor | None = None):
        self.u, self.j, self.prior_type = u, j, prior_type
        self.ranges = torch.cat([half_width(part, prior_type) for part in j.split(TABLE_ENTRIES)])
        self.std = std  # the prior's std in units of Δ, unrounded: for ideal bits only

    def __len__(self) -> int:
        return self.u.numel()

    def segments(self) -> Iterator[Segment]:
        for r in torch.unique(self.ranges).tolist():
            for index in _slices(torch.nonzero(self.ranges == r).squeeze(1), 2 * r + 1):
                yield Segment(index, -r, self.table(index, r))

    def table(self, index: Tensor, r: int) -> np.ndarray:
        """Rows [P(−R), …, P(R)]: differences of F at the edges (k − u − ½)/a, k = −R+1 … R."""
        u, a = self.u[index, None], scale_value(self.j[index])[:, None]
        edges = torch.arange(-r + 1, r + 1, dtype=torch.float64) - 0.5
        cdf = det_cdf(self.prior_type, (edges - u) / a)
        zeros, ones = torch.zeros_like(cdf[:, :1]), torch.ones_like(cdf[:, :1])
        return torch.diff(torch.cat([zeros, cdf, ones], dim=1), dim=1).numpy()


class LosslessModel:
    """p(x_raw | z_0) ∝ exp(−½·e^−γ₀·(y − v_k)²) at y = z_0/α_0 on the grid Y = round(y·2^12).

    With V_k = v_k·2^12 (integers) and k* the bin nearest to Y, the table is
    exp(−c·((Y − V_k)² − (Y − V_k*)²)), c = ½·e^−γ₀·2^-24: integer arithmetic up to one product
    and `det_exp`. Entries farther than w bins from k* (where the exponent exceeds 50) stay 0.
    """

    open_ends = False

    def __init__(self, y: Tensor, gamma_0: float):
        bin_width = 1 << (GRID_BITS - 7)  # 2/256 in grid units
        self.grid = torch.round(y.clamp(-Y_LIMIT, Y_LIMIT) * (1 << GRID_BITS)).to(torch.int64)
        self.c = 0.5 * det_exp(torch.tensor(-gamma_0, dtype=torch.float64)).item() / (1 << 2 * GRID_BITS)
        nearest = torch.div(self.grid + (1 << GRID_BITS), bin_width, rounding_mode="floor")
        self.nearest = nearest.clamp(0, VOCAB_SIZE - 1)
        # n_k ≥ d·(d − 1)·bin_width² at d = |k − k*| bins: entries with d > w are below e^-CUTOFF
        # once c·w·(w + 1)·bin_width² ≥ CUTOFF
        w = 1
        while w < VOCAB_SIZE - 1 and self.c * w * (w + 1) * bin_width**2 < LOSSLESS_CUTOFF:
            w += 1
        self.offsets = torch.arange(-w, w + 1)

    def __len__(self) -> int:
        return self.grid.numel()

    @staticmethod
    def centre(k: Tensor) -> Tensor:
        """V_k = v_k·2^12 = (2k + 1)·2^(12−8) − 2^12."""
        return (2 * k + 1) * (1 << (GRID_BITS - 8)) - (1 << GRID_BITS)

    def segments(self) -> Iterator[Segment]:
        for index in _slices(torch.arange(len(self)), VOCAB_SIZE):
            yield Segment(index, 0, self.table(index))

    def table(self, index: Tensor) -> np.ndarray:
        grid, nearest = self.grid[index, None], self.nearest[index, None]
        k = nearest + self.offsets
        valid = (k >= 0) & (k < VOCAB_SIZE)
        k = k.clamp(0, VOCAB_SIZE - 1)
        n = (grid - self.centre(k)) ** 2 - (grid - self.centre(nearest)) ** 2
        p = torch.where(valid, det_exp(n.to(torch.float64) * -self.c), 0.0)
        return torch.zeros(len(index), VOCAB_SIZE, dtype=torch.float64).scatter_add_(1, k, p).numpy()


def step_model(std: Tensor, delta: Tensor, u: Tensor, prior_type: str, ideal: bool = True) -> StepModel:
    """The entropy model of one step's k for one image, from the prior's std, Δ and the dither
    (keeping the unrounded std/Δ when `ideal`: for ideal bits).

    The only input that carries network noise, the scale a = scale(g)/Δ, is rounded to `j` (in
    slices: no whole-image temporaries). Encoder and decoder both call this.
    """
    std = std.flatten()
    j = torch.cat([scale_index(base_distribution(prior_type, part).scale / delta) for part in std.split(TABLE_ENTRIES)])
    return StepModel(u.flatten(), j, prior_type, std / delta if ideal else None)


def lossless_model(z_0: Tensor, alpha_0: Tensor, gamma_0: Tensor) -> LosslessModel:
    """The entropy model of x_raw for one image given z_0 (encoder and decoder both call this)."""
    return LosslessModel((z_0 / alpha_0).flatten(), float(gamma_0))


def interval_log_mass(std: Tensor, lo: Tensor, hi: Tensor, prior_type: str) -> Tensor:
    """log P(lo < x < hi) under the unquantised prior of std `std`, x = k − u, all in units of Δ
    (a refinement layer's ideal bits are differences of these: they add up to `ideal_step_bits`)."""
    return log_interval_mass(base_distribution(prior_type, std), lo, hi)


def ideal_step_bits(std: Tensor, delta: Tensor, u: Tensor, k: Tensor, prior_type: str) -> float:
    """−log₂ P(k) summed, under the unquantised prior: P(k) = G((k − u + ½)Δ) − G((k − u − ½)Δ)."""
    g = base_distribution(prior_type, std)
    log_mass = log_interval_mass(g, (k - u - 0.5) * delta, (k - u + 0.5) * delta)
    return float(-log_mass.sum()) / math.log(2)

