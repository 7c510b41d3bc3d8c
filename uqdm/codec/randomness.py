"""Shared randomness: the draws that encoder and decoder both make from the seed in the file header.

Every draw comes from its own CPU `torch.Generator`, seeded by a stable hash of
`(seed, purpose, step)`, and is generated in float64 for the whole tile batch of one image in tile
order. CPU generators produce the same numbers for every thread count and machine, so the draws
are bit-identical wherever a file is decoded; they move to the model's device afterwards.
"""

import torch
from torch import Tensor

from uqdm.rng import keyed_generator


def generator(seed: int, purpose: str, step: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by the first 63 bits of SHA-256(`uqdm/<purpose>/<seed>/<step>`)."""
    return keyed_generator("uqdm", purpose, seed, step, device=device)


def top_latent(seed: int, shape: tuple[int, ...]) -> Tensor:
    """z₁ ~ N(0, I), float64 on the CPU (the top of the hierarchy costs no bits)."""
    return torch.randn(shape, generator=generator(seed, "z1"), dtype=torch.float64)


def dither(seed: int, step: int, shape: tuple[int, ...]) -> Tensor:
    """The dither u ~ Uniform(−½, ½) of step `step` (0-based), float64 on the CPU."""
    return torch.rand(shape, generator=generator(seed, "dither", step), dtype=torch.float64) - 0.5
