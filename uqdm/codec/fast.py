"""The fast mode's network: float32, one tile per call, one thread per call.

A float32 network's outputs differ in their last bits with the batch it runs in and the number of
threads (measured on the released tiny weights: up to 6e-6 in ε̂ and 6e-5 in 16·log₂ of the prior
scale, see docs/fast-codec.md), which flips a table of the decoder against the encoder's for about
one pixel in 500. Here the arithmetic of every call is fixed instead: each tile goes through the
network alone, on a single thread, so the bits of its outputs depend on the tile and on the
machine's float32 kernels only, never on how many tiles or threads the caller has. Tiles run
`workers` at a time on Python threads (each call releases the GIL inside its operators).

Everything after the network (μ_p, z_s, the tables) is computed from its outputs in float64 with
elementwise operations, as in the portable mode. What remains machine-dependent, the float32
kernels themselves, is checked: `check_value` hashes the outputs of the first network call (at z₁,
which both sides draw from the seed, on each of the image's tiles: the first `recorded` tiles
through the network, however the caller batches them), the encoder stores it in the header, and a
decoder whose first call hashes differently refuses the file before decoding any chunk.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from .container import CHECK_BYTES


class PerTile(nn.Module):
    """A float32 copy of a score network called on one tile at a time, one thread per call.

    `forward` returns float64 outputs (the caller's precision) and keeps the float32 outputs of
    the first `recorded` tiles through it, over as many calls as they take (for `check_value`).
    """

    def __init__(self, network: nn.Module, workers: int, recorded: int = 0):
        super().__init__()
        self.network = network.float()
        self.n_channels = network.n_channels
        self.workers = max(1, workers)
        self.recorded = recorded
        self.first: list[tuple[Tensor, Tensor | None]] = []

    def _one(self, z: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor | None]:
        torch.set_num_threads(1)
        with torch.inference_mode():
            return self.network(z, gamma_t)

    def forward(self, z: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor | None]:
        tiles, gamma = z.float().split(1), torch.as_tensor(gamma_t).float()
        threads = torch.get_num_threads()
        try:
            workers = min(self.workers, len(tiles))
            if workers == 1:
                outs = [self._one(tile, gamma) for tile in tiles]
            else:
                with ThreadPoolExecutor(workers) as pool:
                    outs = list(pool.map(lambda tile: self._one(tile, gamma), tiles))
        finally:
            torch.set_num_threads(threads)
        eps = torch.cat([o[0] for o in outs])
        factor = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
        kept = sum(len(e) for e, _ in self.first)
        if kept < self.recorded:
            self.first.append((eps[: self.recorded - kept], None if factor is None else factor[: self.recorded - kept]))
        return eps.double(), (None if factor is None else factor.double())

    def check_value(self, span: slice) -> bytes:
        """First CHECK_BYTES of SHA-256 over the float32 outputs of the recorded tiles `span`: ε̂, then
        the scale factor."""
        if sum(len(e) for e, _ in self.first) < self.recorded or not self.recorded:
            raise RuntimeError("the network has not been called on the recorded tiles yet")
        digest = hashlib.sha256()
        for n in range(2):
            if self.first[0][n] is not None:
                digest.update(torch.cat([out[n] for out in self.first])[span].contiguous().cpu().numpy().tobytes())
        return digest.digest()[:CHECK_BYTES]
