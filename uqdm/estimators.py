"""Estimators of the NELBO for training: the full chain (the paper's), and one step per image.

Both return the NELBO's three terms in nats per image (`latent`, `diffusion`, `recon`, each of
shape (B,)) with the same expectation; they differ in cost and variance:

- `chain`: `model.nelbo`, the walk down all T steps along one sample of q: T network calls per
  image, and a backward pass through all of them. Validation, the progressive metrics and every
  rate shown to a user use it, whatever the training estimator.
- `one_step`: one network call per image whatever T is. Image b gets one step i_b, drawn uniformly
  (stratified over the batch); z_{t_i} and z_{s_i} = z_{t_{i+1}} are sampled directly from the
  forward process (`ForwardMarginals`, no network), and the diffusion term is estimated by
  T · rate_i. The latent term is in closed form; the reconstruction term uses z_0 sampled from the
  same draws. Since E_i[T · rate_i] = Σ_i E[rate_i], the estimate is unbiased, and gradients reach
  the learned schedule through the reparameterised samples.

The equations: `docs/equations.md`, section 6.
"""

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .diffusion import DiscreteDiffusion, Step, sum_per_image, to_centered
from .schedules import alpha_sigma

ESTIMATORS = ("chain", "one_step")


@dataclass
class ForwardMarginals:
    """The forward process (q, no network) in closed form on the grid t_i = 1 − i/T, i = 0..T.

    Step j (t_j → t_{j+1}) is affine in (z_{t_j}, x) plus independent noise n_j:
    z_{t_{j+1}} = a_j·z_{t_j} + b_j·x + n_j, with a_j = α_{t_{j+1}}·(1 − e_j)/α_{t_j},
    b_j = α_{t_{j+1}}·e_j, and n_j = Δ_j·(U_j − ½), U_j ~ Uniform(0, 1)^D for UQDM (s_{q,j}·N(0, I)
    for the Gaussian diffusion). Starting from z_{t_0} = z_1 = α_1·x + σ_1·ε, ε ~ N(0, I), and using
    1 − e_j = exp(γ_{t_{j+1}} − γ_{t_j}) (the products of a_j telescope):

        z_{t_i} = α_{t_i}·x + c_i·ε + Σ_{j<i} P_{ij}·n_j,
        c_i = α_{t_i}·exp(γ_{t_i} − γ_1/2)               (= σ_1·a_0·…·a_{i−1}),
        P_{ij} = (α_{t_i}/α_{t_{j+1}})·exp(γ_{t_i} − γ_{t_{j+1}})   (= a_{j+1}·…·a_{i−1}; 1 at i = j+1).

    The coefficient of x is α_{t_i} (a_j·α_{t_j} + b_j = α_{t_{j+1}}), and the variance
    c_i² + Σ_j P_{ij}²·Var(n_j) is σ_{t_i}², as in the Gaussian forward process.
    """

    alpha: Tensor  # (T + 1,): α_{t_i}
    c: Tensor  # (T + 1,): c_i
    P: Tensor  # (T + 1, T): P_{ij}, zero where j ≥ i

    @classmethod
    def of(cls, model: DiscreteDiffusion) -> "ForwardMarginals":
        T = model.n_timesteps
        gamma = torch.stack([model.gamma_at(1 - i / T) for i in range(T + 1)])  # the grid of `model.step`
        alpha, _ = alpha_sigma(gamma)
        c = alpha * torch.exp(gamma - gamma[0] / 2)
        i, j1 = torch.arange(T + 1).unsqueeze(1), torch.arange(1, T + 1).unsqueeze(0)
        P = alpha.unsqueeze(1) / alpha[1:] * torch.exp(gamma.unsqueeze(1) - gamma[1:])
        P = torch.where((j1 <= i).to(gamma.device), P, torch.zeros_like(P))
        return cls(alpha, c, P)

    def sample(self, x: Tensor, i: Tensor, eps: Tensor, noise: Tensor) -> Tensor:
        """z_{t_i} per image: `i` (B,) grid indices, `eps` like x, `noise` (T, *x.shape) the n_j."""
        per_image = lambda v: v.view(-1, *[1] * (x.dim() - 1))
        walked = torch.einsum("bj,jb...->b...", self.P[i], noise)
        return per_image(self.alpha[i]) * x + per_image(self.c[i]) * eps + walked


def stratified_steps(batch_size: int, n_timesteps: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """One step index per image, i_b = ⌊T·(π_b + u)/B⌋ with π a random permutation of 0..B−1 and
    u ~ Uniform(0, 1): every i_b is uniform on 0..T−1, and a batch of B ≥ T images covers every step
    ⌊B/T⌋ or ⌈B/T⌉ times."""
    perm = torch.randperm(batch_size, generator=generator, device=device)
    u = torch.rand((), generator=generator, device=device)
    return ((perm + u) * n_timesteps / batch_size).floor().long().clamp(max=n_timesteps - 1)


def per_image_step(model: DiscreteDiffusion, i: Tensor, ndim: int) -> Step:
    """The schedule quantities of step i_b for each image b, shaped (B, 1, …) to broadcast."""
    steps = [model.step(j) for j in range(model.n_timesteps)]
    shape = (-1, *[1] * (ndim - 1))
    quantities = (f.name for f in fields(Step) if f.name != "i")
    return Step(i=i.view(shape), **{q: torch.stack([getattr(s, q) for s in steps])[i].view(shape) for q in quantities})


def one_step_nelbo(model: DiscreteDiffusion, x_raw: Tensor, steps: Tensor | None = None) -> dict[str, Tensor]:
    """The NELBO's terms in nats per image with one network call per image (see the module's doc).

    `diffusion` = T · (−log(p(z_{s_i})·Δ_i)) at z_{t_i}, z_{s_i} drawn from q directly; `latent` =
    KL(q(z_1|x) ‖ N(0, I)); `recon` = −log p(x_raw | z_0), z_0 from the same draws. `steps` (B,)
    fixes i per image (default: `stratified_steps`). The draws ε, n_0 … n_{T−1} come first and in the
    chain's order, so under the same seed they are the chain's, and the mean over i of the estimate
    is the chain NELBO of that seed.
    """
    T = model.n_timesteps
    marginals = ForwardMarginals.of(model)
    x = to_centered(x_raw).to(marginals.alpha.dtype)
    B = x.shape[0]
    eps = torch.randn_like(x)
    zeros = torch.zeros_like(x)
    noise = torch.stack([model.sample_posterior(zeros, model.step(j)) for j in range(T)])  # n_j
    i = stratified_steps(B, T, device=x.device) if steps is None else steps.to(x.device)
    st = per_image_step(model, i, x.dim())
    z_t = marginals.sample(x, i, eps, noise)
    mu_q = model.posterior_mean(x, z_t, st)
    z_s = mu_q + noise[i, torch.arange(B, device=x.device)]  # = z_{t_{i+1}} of the same draws
    rate = sum_per_image(model.step_rate(z_s, mu_q, model.prior(z_t, st), st))
    z_0 = marginals.sample(x, torch.full_like(i, T), eps, noise)
    return {
        "latent": sum_per_image(model.kl_top(x)),
        "diffusion": T * rate,
        "recon": -sum_per_image(model.log_likelihood(x_raw, z_0)),
    }


def nelbo(model: DiscreteDiffusion, x_raw: Tensor, estimator: str = "chain") -> dict[str, Tensor]:
    """The NELBO's terms in nats per image by `estimator` (one of `ESTIMATORS`)."""
    if estimator == "chain":
        return model.nelbo(x_raw)
    if estimator == "one_step":
        return one_step_nelbo(model, x_raw)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
