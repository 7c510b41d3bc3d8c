"""The progressive chain of a batch: cumulative ideal bits and the decoder's pictures at every
truncation point, with universal quantization as the codec does it, on a `walk.Walk` in the
model's dtype. No Lightning, no files: the training callback's measure (`uqdm evaluate` runs the
codec itself, `codec.compress_progressive`)."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from uqdm.diffusion import UQDM, sum_per_image, to_centered
from uqdm.walk import Walk, quantization_index


def point_names(n_timesteps: int) -> list[str]:
    """Names of the T + 2 truncation points: `z1`, `step_1` … `step_T`, `lossless`."""
    return ["z1", *(f"step_{i}" for i in range(1, n_timesteps + 1)), "lossless"]


@dataclass
class Progression:
    """What a decoder holds at each of the T + 2 truncation points, for a batch of B images.

    `bits[:, j]` are the cumulative ideal bits of point j per image (`bits[:, 0] = 0`);
    `pictures[method][j]` is the uint8 B×3×H×W picture shown at point j (the last is exact).
    """

    bits: Tensor
    pictures: dict[str, list[Tensor]]


@dataclass
class SharedNoise:
    """The draws encoder and decoder share: z_1 ~ N(0, I) and one dither u ~ Uniform(−½, ½)^D per step."""

    top: Tensor
    dithers: list[Tensor]

    @classmethod
    def draw(cls, shape, n_timesteps: int, generator: torch.Generator | None = None, device=None,
             dtype: torch.dtype = torch.float64) -> "SharedNoise":
        """z_1, then u_1 … u_T, from `generator`."""
        draw = dict(generator=generator, device=device, dtype=dtype)
        top = torch.randn(shape, **draw)
        return cls(top, [torch.rand(shape, **draw) - 0.5 for _ in range(n_timesteps)])


@torch.no_grad()
def progressive_chain(
    model: UQDM,
    x_raw: Tensor,
    noise: SharedNoise,
    methods: tuple[str, ...] | list[str] = ("denoise",),
    generator: torch.Generator | None = None,
) -> Progression:
    """Code a batch step by step and reconstruct it at every truncation point.

    From z_1 = `noise.top`, step t → s with dither u = `noise.dithers[i]` sends
    k = round((μ_q − μ_p)/Δ + u) and moves to z_s = μ_p + (k − u)·Δ; it costs Σ_D −log₂ P(k), which
    is −log₂(p(z_s)·Δ) at that z_s. The lossless point adds −log₂ p(x_raw | z_0). The picture after
    i steps is `model.reconstruct(z_t, i, method)`, reusing the step's prior (so `denoise` costs no
    network call); `ancestral` samples from `generator`. Runs in the dtype and on the device of the
    model's parameters.
    """
    T = model.n_timesteps
    ref = next(model.parameters())
    as_model = dict(device=ref.device, dtype=ref.dtype)
    x = to_centered(x_raw).to(**as_model)
    walk = Walk(model, noise.top.to(**as_model))
    bits = [torch.zeros(x.shape[0], **as_model)]
    pictures: dict[str, list[Tensor]] = {m: [] for m in methods}
    for node in walk:
        for m in methods:
            pictures[m].append(model.reconstruct(node.z_t, node.i, m, prior=node.prior, generator=generator))
        mu_q = model.posterior_mean(x, node.z_t, node.step)
        u = noise.dithers[node.i].to(**as_model)
        z = node.quantize(quantization_index(mu_q, node.prior.mean, node.step.delta, u), u)
        bits.append(bits[-1] + sum_per_image(model.step_rate(z, mu_q, node.prior, node.step)) / math.log(2))
    for m in methods:
        pictures[m].append(model.reconstruct(walk.z, T, m, generator=generator))
        pictures[m].append(x_raw.to(device=ref.device, dtype=torch.uint8))
    bits.append(bits[-1] - sum_per_image(model.log_likelihood(x_raw.to(ref.device), walk.z)) / math.log(2))
    return Progression(torch.stack(bits, dim=1), pictures)
