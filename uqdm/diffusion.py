"""The discrete-time diffusion objective (NELBO in nats) and its progressive reconstructions.

Plain `nn.Module`s: they know nothing of Lightning, files or entropy coders. `DiscreteDiffusion`
holds what both kinds share (the steps, the prior, the top and bottom of the hierarchy, the NELBO
and the reconstructions); `UQDM` (uniform posteriors: a real code) and `GaussianDiffusion` (a
theoretical rate) are its two kinds. Every loop over the steps is a `walk.Walk`, so the loss, the
encoder, the decoder and the evaluation can never disagree about a step. Symbols follow
`docs/equations.md`.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .distributions import base_distribution, log_prob_uniform_convolved
from .options import RECONSTRUCTIONS
from .schedules import NoiseSchedule, alpha_sigma
from .walk import Walk

VOCAB_SIZE = 256
DIFFUSIONS = ("uniform", "gaussian")


def to_centered(x_raw: Tensor) -> Tensor:
    """x = 2·(x_raw + ½)/256 − 1 ∈ (−1, 1)."""
    return 2 * (x_raw.to(torch.get_default_dtype()) + 0.5) / VOCAB_SIZE - 1


def sum_per_image(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch."""
    return x.flatten(1).sum(1)


@dataclass
class Step:
    """Step i's schedule quantities, t → s (scalars, shared by a whole batch)."""

    i: int | Tensor  # the step's index, 0-based (per image in the one-step estimator)
    gamma_t: Tensor
    gamma_s: Tensor
    alpha_t: Tensor
    sigma_t: Tensor
    alpha_s: Tensor
    sigma_s: Tensor
    e: Tensor  # −expm1(γ_s − γ_t)
    delta: Tensor  # Δ = √12·σ_s·√e, the width of the UQDM posterior box

    @property
    def posterior_std(self) -> Tensor:
        """s_q = σ_s·√e."""
        return self.sigma_s * self.e.sqrt()


@dataclass
class Prior:
    """The network's prediction at z_t and the prior p(z_s | z_t) built from it."""

    mean: Tensor  # μ_p
    std: Tensor  # std of the base density g
    x_hat: Tensor  # clip((z_t − σ_t·ε̂)/α_t, −1, 1)
    x_hat_unclipped: Tensor

    def __getitem__(self, rows: slice) -> "Prior":
        """The prior of some rows of the batch."""
        return Prior(self.mean[rows], self.std[rows], self.x_hat[rows], self.x_hat_unclipped[rows])


class DiscreteDiffusion(nn.Module, ABC):
    """A T-step diffusion with a learned prior p(z_s | z_t) whose location comes from a network.

    Its kinds differ in the posterior q(z_s | z_t, x), the prior's shape around μ_p, and the rate
    of a step (`sample_posterior`, `sample_prior`, `step_rate`).

    Args:
        network: maps `(z_t, γ_t)` to `(ε̂, scale factor or None)`.
        schedule: γ(t).
        n_timesteps: T, steps on the grid t_i = 1 − i/T.
        prior_type: base density g, "logistic" or "normal".
        base_prior_scale: "forward_kernel" (c = σ_t·√e, the paper's) or "default" (c = σ_s·√e).
        clip_prior_mean: μ_p is the posterior mean at the clipped x̂ (the paper's code); without
            it, μ_p = (α_s/α_t)·(z_t − σ_t·e·ε̂). The two agree whenever x̂ lies in [−1, 1].
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        n_timesteps: int = 4,
        prior_type: str = "logistic",
        base_prior_scale: str = "forward_kernel",
        clip_prior_mean: bool = True,
    ):
        super().__init__()
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be at least 1, got {n_timesteps}")
        if base_prior_scale not in ("forward_kernel", "default"):
            raise ValueError(f"unknown base_prior_scale {base_prior_scale!r}")
        base_distribution(prior_type, torch.ones(()))  # validates the name
        self.network = network
        self.schedule = schedule
        self.n_timesteps = n_timesteps
        self.prior_type = prior_type
        self.base_prior_scale = base_prior_scale
        self.clip_prior_mean = clip_prior_mean

    # --- one step ---------------------------------------------------------------------------
    def _time(self, t: float) -> Tensor:
        ref = next(self.schedule.buffers(), None)
        ref = ref if ref is not None else next(self.schedule.parameters())
        return torch.tensor(t, dtype=ref.dtype, device=ref.device)

    def gamma_at(self, t: float) -> Tensor:
        """γ(t) for a Python float t."""
        return self.schedule(self._time(t))

    def step(self, i: int) -> Step:
        """Step i (0-based) of T: from t = 1 − i/T to s = 1 − (i+1)/T."""
        T = self.n_timesteps
        gamma_t, gamma_s = self.gamma_at(1 - i / T), self.gamma_at(1 - (i + 1) / T)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(gamma_t), alpha_sigma(gamma_s)
        e = -torch.expm1(gamma_s - gamma_t)
        delta = math.sqrt(12) * sigma_s * e.sqrt()
        return Step(i, gamma_t, gamma_s, alpha_t, sigma_t, alpha_s, sigma_s, e, delta)

    def posterior_mean(self, x: Tensor, z_t: Tensor, st: Step) -> Tensor:
        """μ_q = α_s·((1 − e)/α_t·z_t + e·x)."""
        return st.alpha_s * ((1 - st.e) / st.alpha_t * z_t + st.e * x)

    def prior(self, z_t: Tensor, st: Step) -> Prior:
        """One network call: ε̂ at z_t, then μ_p and the std of g (c times the learned factor)."""
        eps_hat, factor = self.predict(z_t, st)
        x_hat_unclipped = (z_t - st.sigma_t * eps_hat) / st.alpha_t
        x_hat = x_hat_unclipped.clamp(-1, 1)
        if self.clip_prior_mean:
            mean = self.posterior_mean(x_hat, z_t, st)
        else:
            mean = st.alpha_s / st.alpha_t * (z_t - st.sigma_t * st.e * eps_hat)
        base = st.sigma_t if self.base_prior_scale == "forward_kernel" else st.sigma_s
        std = base * st.e.sqrt()
        if factor is not None:
            std = std * factor
        return Prior(mean, std.expand_as(mean), x_hat, x_hat_unclipped)

    def predict(self, z_t: Tensor, st: Step) -> tuple[Tensor, Tensor | None]:
        """The network's (ε̂, scale factor or None) at z_t of step `st`: `network(z_t, γ_t)`."""
        return self.network(z_t, st.gamma_t)

    def base(self, prior: Prior):
        """The base density g of the prior (centred at 0)."""
        return base_distribution(self.prior_type, prior.std)

    @abstractmethod
    def sample_posterior(self, mu_q: Tensor, st: Step) -> Tensor:
        """z_s ~ q(z_s | z_t, x), centred at μ_q."""

    @abstractmethod
    def sample_prior(self, prior: Prior, st: Step, generator: torch.Generator | None = None) -> Tensor:
        """z_s ~ p(z_s | z_t)."""

    @abstractmethod
    def step_rate(self, z_s: Tensor, mu_q: Tensor, prior: Prior, st: Step) -> Tensor:
        """The step's rate in nats per dimension, at the latent z_s reached from μ_q."""

    # --- top and bottom -----------------------------------------------------------------------
    def kl_top(self, x: Tensor) -> Tensor:
        """KL(N(α_1·x, σ_1²) ‖ N(0, 1)) per dimension."""
        alpha_1, sigma_1 = alpha_sigma(self.gamma_at(1.0))
        return 0.5 * (sigma_1**2 + (alpha_1 * x) ** 2 - 1) - torch.log(sigma_1)

    def sample_top(self, x: Tensor) -> Tensor:
        """z_1 ~ q(z_1 | x) = N(α_1·x, σ_1²)."""
        alpha_1, sigma_1 = alpha_sigma(self.gamma_at(1.0))
        return alpha_1 * x + sigma_1 * torch.randn_like(x)

    def decoder_logits(self, z_0: Tensor) -> Tensor:
        """Log-probabilities of p(x_raw | z_0) over the 256 values, shape (..., 256).

        Logits −½·exp(−γ_0)·(z_0/α_0 − v_k)², v_k = 2·(k + ½)/256 − 1.
        """
        gamma_0 = self.gamma_at(0.0)
        alpha_0, _ = alpha_sigma(gamma_0)
        v = to_centered(torch.arange(VOCAB_SIZE, device=z_0.device)).to(z_0.dtype)
        logits = -0.5 * torch.exp(-gamma_0) * (z_0.unsqueeze(-1) / alpha_0 - v) ** 2
        return torch.log_softmax(logits, dim=-1)

    def log_likelihood(self, x_raw: Tensor, z_0: Tensor) -> Tensor:
        """log p(x_raw | z_0) per dimension."""
        log_probs = self.decoder_logits(z_0)
        return log_probs.gather(-1, x_raw.long().unsqueeze(-1)).squeeze(-1)

    def decode_argmax(self, z_0: Tensor) -> Tensor:
        """argmax of p(x_raw | z_0): the value v_k nearest to z_0/α_0, as uint8."""
        alpha_0, _ = alpha_sigma(self.gamma_at(0.0))
        k = torch.floor((z_0 / alpha_0 + 1) * (VOCAB_SIZE / 2))
        return k.clamp(0, VOCAB_SIZE - 1).to(torch.uint8)

    def decode_sample(self, z_0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw from p(x_raw | z_0), as uint8."""
        probs = self.decoder_logits(z_0).exp().flatten(0, -2)
        draws = torch.multinomial(probs, 1, generator=generator).view(z_0.shape)
        return draws.to(torch.uint8)

    # --- the objective ------------------------------------------------------------------------
    def nelbo(self, x_raw: Tensor) -> dict[str, Tensor]:
        """The NELBO's three terms in nats per image, each of shape (B,).

        `latent` = KL(q(z_1|x) ‖ N(0, I)); `diffusion` = Σ_steps −log(p(z_s)·Δ) along a sample of q;
        `recon` = −log p(x_raw | z_0).
        """
        x = to_centered(x_raw).to(self._time(0.0).dtype)
        latent = sum_per_image(self.kl_top(x))
        walk = Walk(self, self.sample_top(x))
        diffusion = torch.zeros_like(latent)
        for node in walk:
            mu_q = self.posterior_mean(x, node.z_t, node.step)
            node.z_s = self.sample_posterior(mu_q, node.step)
            diffusion = diffusion + sum_per_image(self.step_rate(node.z_s, mu_q, node.prior, node.step))
        recon = -sum_per_image(self.log_likelihood(x_raw, walk.z))
        return {"latent": latent, "diffusion": diffusion, "recon": recon}

    # --- progressive reconstruction from z_t after i of T steps ---------------------------------
    def reconstruct(
        self,
        z_t: Tensor,
        i: int,
        method: str,
        prior: Prior | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The picture (uint8) the decoder shows holding z_t after i of T steps.

        `prior` (the network's prediction at z_t, step i) saves a network call when the caller has
        it. At z_0 (i = T) `denoise` and `flow_based` take the argmax of p(x_raw | z_0) and
        `ancestral` draws from it, as in the paper's code.
        """
        T = self.n_timesteps
        if method not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {method!r}; choose one of {RECONSTRUCTIONS}")
        if i == T:
            return self.decode_sample(z_t, generator) if method == "ancestral" else self.decode_argmax(z_t)
        if method == "denoise":
            prior = prior if prior is not None else self.prior(z_t, self.step(i))
            return self.decode_argmax(prior.x_hat)
        walk = Walk(self, z_t, start=i, prior=prior)
        for node in walk:
            z, st = node.z_t, node.step
            if method == "ancestral":
                node.z_s = self.sample_prior(self._sampling_prior(node.prior, z, st), st, generator)
            else:  # flow_based: z_s = (σ_s/σ_t)·z_t − (α_t·σ_s/σ_t − α_s)·x̂, x̂ unclipped
                ratio = st.sigma_s / st.sigma_t
                node.z_s = ratio * z - (st.alpha_t * ratio - st.alpha_s) * node.prior.x_hat_unclipped
        return self.decode_argmax(walk.z)

    def _sampling_prior(self, prior: Prior, z_t: Tensor, st: Step) -> Prior:
        """Ancestral sampling always centres p at the posterior mean of the clipped x̂."""
        if self.clip_prior_mean:
            return prior
        mean = self.posterior_mean(prior.x_hat, z_t, st)
        return Prior(mean, prior.std, prior.x_hat, prior.x_hat_unclipped)


class UQDM(DiscreteDiffusion):
    """Universally quantized diffusion: uniform posteriors, prior g ⊛ Uniform(−Δ/2, Δ/2); its rate
    is the length of a real code (`uqdm.codec`)."""

    def sample_posterior(self, mu_q: Tensor, st: Step) -> Tensor:
        """z_s ~ Uniform(μ_q − Δ/2, μ_q + Δ/2)."""
        return mu_q + st.delta * (torch.rand_like(mu_q) - 0.5)

    def sample_prior(self, prior: Prior, st: Step, generator: torch.Generator | None = None) -> Tensor:
        """z_s ~ p(z_s | z_t) = g ⊛ Uniform(−Δ/2, Δ/2), around the prior mean."""
        shape, dev = prior.mean.shape, prior.mean.device
        v = torch.rand(shape, generator=generator, device=dev, dtype=prior.mean.dtype)
        v = v.clamp(1e-12, 1 - 1e-12)
        g = self.base(prior)
        if self.prior_type == "logistic":
            noise = g.scale * torch.log(v / (1 - v))
        else:
            noise = g.scale * math.sqrt(2) * torch.erfinv(2 * v - 1)
        w = torch.rand(shape, generator=generator, device=dev, dtype=prior.mean.dtype)
        return prior.mean + noise + st.delta * (w - 0.5)

    def step_rate(self, z_s: Tensor, mu_q: Tensor, prior: Prior, st: Step) -> Tensor:
        """Rate in nats per dimension: −log(p(z_s)·Δ), whose mean under q is KL(q ‖ p)."""
        return -log_prob_uniform_convolved(self.base(prior), z_s - prior.mean, st.delta)


class GaussianDiffusion(DiscreteDiffusion):
    """The same discrete-time model with Gaussian q and p (Ho et al. 2020; Theis et al. 2022).

    Its rate KL(q ‖ p) is a theoretical figure: no practical coder achieves it (it would need
    relative entropy coding). The prior's base density is always normal here.
    """

    def sample_posterior(self, mu_q: Tensor, st: Step) -> Tensor:
        """z_s ~ N(μ_q, s_q²)."""
        return mu_q + st.posterior_std * torch.randn_like(mu_q)

    def sample_prior(self, prior: Prior, st: Step, generator: torch.Generator | None = None) -> Tensor:
        """z_s ~ N(μ_p, c²)."""
        noise = torch.randn(prior.mean.shape, generator=generator, device=prior.mean.device, dtype=prior.mean.dtype)
        return prior.mean + prior.std * noise

    def step_rate(self, z_s: Tensor, mu_q: Tensor, prior: Prior, st: Step) -> Tensor:
        """KL(N(μ_q, s_q²) ‖ N(μ_p, c²)) = log(c/s_q) + (s_q² + (μ_q − μ_p)²)/(2c²) − ½."""
        s_q, c = st.posterior_std, prior.std
        return torch.log(c / s_q) + (s_q**2 + (mu_q - prior.mean) ** 2) / (2 * c**2) - 0.5

