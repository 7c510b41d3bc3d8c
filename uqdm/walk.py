"""The walk down the diffusion hierarchy, and universal quantization (symbols as in docs/equations.md).

A walk starts from a latent z_t at step `start` (z₁ at step 0) and, for each step t → s on the grid
t_i = 1 − i/T, computes the step's schedule quantities and the prior p(z_s | z_t) at z_t (one
network call), hands them to its consumer as a `Node`, and continues from the z_s the consumer
chose. It is the only loop over the steps in `uqdm`; its consumers differ only in how they choose
z_s:

- the chain NELBO (training): z_s ~ q(z_s | z_t, x);
- the encoder and the progressive evaluation: k = round((μ_q − μ_p)/Δ + u), z_s = μ_p + (k − u)·Δ;
- the decoder: k from the file, z_s = μ_p + (k − u)·Δ;
- the reconstructions that run the remaining steps from a truncation point: z_s ~ p(z_s | z_t)
  (ancestral) or the deterministic flow (flow-based).

The walk needs of its model only `step(i)` and `prior(z_t, step)` (`diffusion.DiscreteDiffusion`).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .diffusion import DiscreteDiffusion, Prior, Step


def quantization_index(mu_q: Tensor, mu_p: Tensor, delta: Tensor, u: Tensor) -> Tensor:
    """What the encoder sends: k = round((μ_q − μ_p)/Δ + u), with the shared dither u ~ Uniform(−½, ½)."""
    return torch.round((mu_q - mu_p) / delta + u)


def dequantize(k: Tensor, u: Tensor, mu_p: Tensor, delta: Tensor) -> Tensor:
    """The latent both sides continue from: z_s = μ_p + (k − u)·Δ."""
    return mu_p + (k - u) * delta


def universal_quantize(mu_q: Tensor, mu_p: Tensor, delta: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Universal quantization of one step: k and z_s = μ_p + (k − u)·Δ.

    z_s is then an exact sample of Uniform(μ_q − Δ/2, μ_q + Δ/2) = q(z_s | z_t, x).
    """
    k = quantization_index(mu_q, mu_p, delta, u)
    return k, dequantize(k, u, mu_p, delta)


@dataclass
class Node:
    """Step `i` of a walk, t = 1 − i/T → s = 1 − (i + 1)/T: the latent z_t, the step's quantities
    and the prior p(z_s | z_t) at z_t. The consumer sets `z_s` (directly or with `quantize`)."""

    i: int
    z_t: Tensor
    step: "Step"
    prior: "Prior"
    z_s: Tensor | None = None

    def quantize(self, k: Tensor, u: Tensor) -> Tensor:
        """Continue from z_s = μ_p + (k − u)·Δ (the encoder's k from μ_q, or the decoder's from the file)."""
        self.z_s = dequantize(k, u, self.prior.mean, self.step.delta)
        return self.z_s


class Walk:
    """The steps `start` … `stop` − 1 (default: to z₀) from the latent `z` at step `start`.

    Iterating yields one `Node` per step; after the consumer has set the node's `z_s`, the walk moves
    there. `z` is the latent reached so far (z_s of the last step, or the start when no step ran).
    `prior`, when the caller already has the prior at the start (the network's prediction at z_t of
    step `start`), saves that step's network call.
    """

    def __init__(self, model: "DiscreteDiffusion", z: Tensor, start: int = 0, stop: int | None = None,
                 prior: "Prior | None" = None):
        self.model, self.z, self.start = model, z, start
        self.stop = model.n_timesteps if stop is None else stop
        self._first_prior = prior

    def __iter__(self) -> Iterator[Node]:
        for i in range(self.start, self.stop):
            st = self.model.step(i)
            prior = self._first_prior if (i == self.start and self._first_prior is not None) else self.model.prior(self.z, st)
            node = Node(i, self.z, st, prior)
            yield node
            if node.z_s is None:
                raise RuntimeError(f"the walk's consumer chose no z_s at step {i + 1}")
            self.z = node.z_s
            del node, prior  # not held through the next step's network call
