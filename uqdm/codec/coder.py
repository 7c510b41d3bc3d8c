"""The range coder: `constriction` calls that turn integer symbols into bytes under a table model
and back, with an escape for values beyond a table's ends and a short termination."""

import constriction
import numpy as np
import torch
from torch import Tensor

from uqdm.errors import UQDMError

from .tables import LosslessModel, StepModel

CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
UNIFORM = constriction.stream.model.Uniform()


def _ends(symbols: Tensor, width: int, open: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positions of open end symbols (0 or width − 1; `Segment.open`) and the sign of their
    excess (−1 low, +1 high)."""
    low, high = symbols == 0, symbols == width - 1
    if open is not None:
        low, high = low & open[:, 0], high & open[:, 1]
    at_end = torch.nonzero(low | high).squeeze(1)
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
            at_end, sign = _ends(symbols, width, seg.open)
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


def decode(model: StepModel | LosslessModel, payload: bytes, where: str = "a segment") -> Tensor:
    """The `len(model)` values (int64) that `encode` coded into `payload` (`where`: which part of
    the file, for the error message, e.g. "layer 2 of step 3").

    Raises:
        UQDMError: the range decoder refuses the payload (not the output of `encode` for this model).
    """
    try:
        return _decode(model, payload)
    except Exception as e:  # constriction's AssertionError/ValueError on a payload it cannot decode
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UQDMError(f"{where} of the .uqdm file cannot be decoded ({detail}); "
                        "is the file corrupt or from another encoder?") from None


def _decode(model: StepModel | LosslessModel, payload: bytes) -> Tensor:
    padded = payload + b"\0" * (-len(payload) % 4)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))
    values = torch.zeros(len(model), dtype=torch.int64)  # symbols no segment codes are 0
    ends, signs = [], []
    for seg in model.segments():
        symbols = torch.from_numpy(decoder.decode(CATEGORICAL, seg.table).astype(np.int64))
        values[seg.index] = symbols + seg.low
        if model.open_ends:
            at_end, sign = _ends(symbols, seg.table.shape[1], seg.open)
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
