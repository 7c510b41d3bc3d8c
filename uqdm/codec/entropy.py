"""The entropy models of a `.uqdm` file's symbols and the `constriction` calls that code them.

Encoder and decoder build every probability table with the same functions, `step_model` and
`lossless_model`, from inputs that are identical on both sides:

- the shared dither `u` (exact: see `randomness`),
- an integer index `j` of the prior's scale relative to Δ on the fixed table `2^(j/16)`,
- for the lossless step, `y = z_0/α_0` rounded to an integer multiple of `2^-12`.

Network outputs differ in their last bits between batch sizes, thread counts and devices (in
float64: ~1e-14 relative in the scale, ~1e-15 absolute in z_0); only the rounding of `j` and of
`y` sees them, which then lands on another value with probability ~1e-13 per step symbol and
~1e-12 per pixel of the lossless step. The tables themselves are computed with IEEE-754 basic
operations only (+, −, ×, ÷, and an `exp` of our own built from them), which are correctly
rounded and therefore bit-identical on every device, thread count and tensor layout;
`constriction` then quantises them deterministically.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from torch import Tensor

from uqdm.distributions import base_distribution, log_interval_mass
from uqdm.errors import UQDMError

SCALE_STEPS = 16  # scale table entries per octave: a_j = 2^(j/16)
SCALE_INDEX_LIMIT = 20 * SCALE_STEPS  # a_j ∈ [2^-20, 2^20]
TAIL = {"logistic": 12.0, "normal": 4.5}  # tables reach ±TAIL·a_j (tail mass ≲ 1e-5 per side)
RANGES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # allowed half-widths R
GRID_BITS = 12  # y = z_0/α_0 is rounded to multiples of 2^-12
Y_LIMIT = 2  # ... after clipping to [−2, 2]
LOSSLESS_CUTOFF = 50.0  # lossless table entries below e^-50 (≪ 2^-24) are left at zero
TABLE_ENTRIES = 1 << 16  # float64 table entries built at once (512 KiB: the arithmetic stays in cache)
VOCAB_SIZE = 256

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

CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
UNIFORM = constriction.stream.model.Uniform()


# --- deterministic elementwise math -----------------------------------------------------------
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


# --- the two kinds of symbols -----------------------------------------------------------------
@dataclass
class Segment:
    """Symbols `index` coded in one call: value v is symbol v − low under the row's table."""

    index: Tensor
    low: int
    table: np.ndarray  # (len(index), width) float64, rows need not sum to 1


def scale_index(scale: Tensor) -> Tensor:
    """j = round(16·log₂ a), clipped to ±20 octaves: the integer the tables are built from."""
    j = torch.round(SCALE_STEPS * torch.log2(scale.clamp_min(1e-300)))
    return j.clamp(-SCALE_INDEX_LIMIT, SCALE_INDEX_LIMIT).to(torch.int64)


def scale_value(j: Tensor) -> Tensor:
    """a_j = 2^(j/16)."""
    return pow2(j * ((1 << EXP2_BITS) // SCALE_STEPS))


def half_width(j: Tensor, prior_type: str) -> Tensor:
    """R(j): the smallest entry of `RANGES` with R ≥ TAIL·a_j + 1."""
    need = TAIL[prior_type] * scale_value(j) + 1
    ranges = torch.tensor(RANGES, dtype=torch.float64)
    pick = torch.searchsorted(ranges, need).clamp(max=len(RANGES) - 1)
    return torch.tensor(RANGES, dtype=torch.int64)[pick]


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

    def __init__(self, u: Tensor, j: Tensor, prior_type: str):
        self.u, self.j, self.prior_type = u, j, prior_type
        self.ranges = half_width(j, prior_type)

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


def step_model(std: Tensor, delta: Tensor, u: Tensor, prior_type: str) -> StepModel:
    """The entropy model of one step's k for one image, from the prior's std, Δ and the dither.

    The only input that carries network noise, the scale a = scale(g)/Δ, is rounded to `j`.
    Encoder and decoder both call this.
    """
    scale = base_distribution(prior_type, std).scale / delta
    return StepModel(u.flatten(), scale_index(scale.flatten()), prior_type)


def lossless_model(z_0: Tensor, alpha_0: Tensor, gamma_0: Tensor) -> LosslessModel:
    """The entropy model of x_raw for one image given z_0 (encoder and decoder both call this)."""
    return LosslessModel((z_0 / alpha_0).flatten(), float(gamma_0))


def ideal_step_bits(std: Tensor, delta: Tensor, u: Tensor, k: Tensor, prior_type: str) -> float:
    """−log₂ P(k) summed, under the unquantised prior: P(k) = G((k − u + ½)Δ) − G((k − u − ½)Δ)."""
    g = base_distribution(prior_type, std)
    log_mass = log_interval_mass(g, (k - u - 0.5) * delta, (k - u + 0.5) * delta)
    return float(-log_mass.sum()) / math.log(2)


# --- coding -----------------------------------------------------------------------------------
def _ends(symbols: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Positions of end symbols (0 or width − 1) and the sign of their excess (−1 low, +1 high)."""
    at_end = torch.nonzero((symbols == 0) | (symbols == width - 1)).squeeze(1)
    return at_end, torch.where(symbols[at_end] == 0, -1, 1)


def encode(model: StepModel | LosslessModel, values: Tensor) -> bytes:
    """Range-code integer `values` (flat, int64) under `model`; see `decode`."""
    encoder = constriction.stream.queue.RangeEncoder()
    excess = []
    for seg in model.segments():
        width = seg.table.shape[1]
        v = values[seg.index] - seg.low
        symbols = v.clamp(0, width - 1)
        encoder.encode(symbols.to(torch.int32).numpy(), CATEGORICAL, seg.table)
        if model.open_ends:
            at_end, sign = _ends(symbols, width)
            excess.append(sign * (v[at_end] - symbols[at_end]))
    if excess:
        _encode_excess(encoder, torch.cat(excess))
    return _sealed(encoder)


def _sealed(encoder) -> bytes:
    """The coded words, big-endian, ended by the point of the coder's final interval with the most
    trailing zero bits, and stripped of trailing zero bytes (the decoder reads zeros past the end).

    The decoder's 64-bit window after the last symbol is the two words after the `n` emitted ones;
    any point of [lower, lower + range) there decodes the same symbols. `constriction`'s own seal
    is one such point (a whole word); when it resolved a pending carry into the emitted words, it
    is kept as it is.
    """
    n, (lower, width) = encoder.pos()
    words = [int(w) for w in encoder.get_compressed()]
    tail = words[n:] + [0, 0]
    if len(words) > n and (tail[0] << 32 | tail[1]) >= lower:
        end = min(lower + width, 1 << 64)
        point = next(p for b in range(64, -1, -1) if (p := -(-lower >> b) << b) < end)
        words = words[:n] + [point >> 32, point & 0xFFFFFFFF]
    return np.array(words, dtype=">u4").tobytes().rstrip(b"\0")


def decode(model: StepModel | LosslessModel, payload: bytes, chunk: int = 0) -> Tensor:
    """The `len(model)` values (int64) that `encode` coded into `payload` (chunk number `chunk`).

    Raises:
        UQDMError: the range decoder refuses the payload (not the output of `encode` for this model).
    """
    try:
        return _decode(model, payload)
    except Exception as e:  # constriction's AssertionError/ValueError on a payload it cannot decode
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UQDMError(f"chunk {chunk} of the .uqdm file cannot be decoded ({detail}); "
                        "is the file corrupt or from another encoder?") from None


def _decode(model: StepModel | LosslessModel, payload: bytes) -> Tensor:
    padded = payload + b"\0" * (-len(payload) % 4)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))
    values = torch.empty(len(model), dtype=torch.int64)
    ends, signs = [], []
    for seg in model.segments():
        symbols = torch.from_numpy(decoder.decode(CATEGORICAL, seg.table).astype(np.int64))
        values[seg.index] = symbols + seg.low
        if model.open_ends:
            at_end, sign = _ends(symbols, seg.table.shape[1])
            ends.append(seg.index[at_end])
            signs.append(sign)
    if ends:
        ends, signs = torch.cat(ends), torch.cat(signs)
        values[ends] += signs * _decode_excess(decoder, len(ends))
    return values


# Excesses m ≥ 0 (rare): Elias-gamma style, n = m + 1 with b = ⌊log₂ n⌋ coded uniformly over
# 0..63, then the b low bits of n, least significant 16 at a time.
EXCESS_PIECES = 4


def _encode_excess(encoder, m: Tensor) -> None:
    n = m + 1
    if (n >= 1 << 62).any():
        raise ValueError("a quantisation index is out of range (|k| ≥ 2^62)")
    b = (n[:, None] >= (1 << torch.arange(1, 63))).sum(1)
    encoder.encode(b.to(torch.int32).numpy(), UNIFORM, np.full(len(b), 64, dtype=np.int32))
    for piece in range(EXCESS_PIECES):
        bits = (b - 16 * piece).clamp(0, 16)
        sel = bits > 0
        chunk = (n[sel] >> (16 * piece)) & ((1 << bits[sel]) - 1)
        encoder.encode(chunk.to(torch.int32).numpy(), UNIFORM, (1 << bits[sel]).to(torch.int32).numpy())


def _decode_excess(decoder, count: int) -> Tensor:
    b = torch.from_numpy(decoder.decode(UNIFORM, np.full(count, 64, dtype=np.int32)).astype(np.int64))
    n = 1 << b
    for piece in range(EXCESS_PIECES):
        bits = (b - 16 * piece).clamp(0, 16)
        sel = bits > 0
        chunk = decoder.decode(UNIFORM, (1 << bits[sel]).to(torch.int32).numpy())
        n[sel] |= torch.from_numpy(chunk.astype(np.int64)) << (16 * piece)
    return n - 1
