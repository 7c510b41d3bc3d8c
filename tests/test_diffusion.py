"""The objective against an independent computation on small tensors."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from uqdm.diffusion import GaussianDiffusion, UQDM, to_centered
from uqdm.schedules import make_schedule

D = torch.float64


def naive_prior_log_mass(z, mean, std, delta, prior_type):
    """log ∫ g(z − μ − v) dv over |v| < Δ/2, by the plain CDF difference in float64."""
    x = z - mean
    if prior_type == "logistic":
        cdf = lambda y: torch.sigmoid(y / (std * math.sqrt(3) / math.pi))
    else:
        cdf = lambda y: Normal(0.0, std).cdf(y)
    return torch.log(cdf(x + delta / 2) - cdf(x - delta / 2))


def replay_nelbo(model, x_raw, prior_type, gaussian=False):
    """An independent NELBO: same random draws, textbook formulas, no shared helpers."""
    T = model.n_timesteps
    g = lambda t: model.schedule(torch.tensor(t, dtype=D))
    a = lambda t: torch.sqrt(torch.sigmoid(-g(t)))
    s = lambda t: torch.sqrt(torch.sigmoid(g(t)))
    x = (2 * x_raw.to(D) + 1) / 256 - 1
    q1 = Normal(a(1.0) * x, s(1.0))
    latent = kl_divergence(q1, Normal(torch.zeros_like(x), torch.ones_like(x))).sum((1, 2, 3))
    z = a(1.0) * x + s(1.0) * torch.randn_like(x)
    diff = torch.zeros(x.shape[0], dtype=D)
    for i in range(T):
        t, u = 1 - i / T, 1 - (i + 1) / T
        snr_ratio = torch.exp(g(u) - g(t))  # SNR_t / SNR_s
        e = 1 - snr_ratio
        eps, factor = model.network(z, g(t))
        xh = ((z - s(t) * eps) / a(t)).clamp(-1, 1)
        # VDM eq. 26: posterior mean with x and with the clipped prediction
        mq = a(t) / a(u) * s(u) ** 2 / s(t) ** 2 * z + a(u) * e * x
        mp = a(t) / a(u) * s(u) ** 2 / s(t) ** 2 * z + a(u) * e * xh
        c = s(t) * torch.sqrt(e) * factor
        sq = s(u) * torch.sqrt(e)
        if gaussian:
            z = mq + sq * torch.randn_like(mq)
            diff += kl_divergence(Normal(mq, sq), Normal(mp, c)).sum((1, 2, 3))
        else:
            delta = math.sqrt(12) * sq
            z = mq + delta * (torch.rand_like(mq) - 0.5)
            diff += -naive_prior_log_mass(z, mp, c, delta, prior_type).sum((1, 2, 3))
    a0 = a(0.0)
    v = (2 * torch.arange(256, dtype=D) + 1) / 256 - 1
    logits = -0.5 * torch.exp(-g(0.0)) * (z[..., None] / a0 - v) ** 2
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    recon = -logp.gather(-1, x_raw.long()[..., None]).squeeze(-1).sum((1, 2, 3))
    return latent, diff, recon


@pytest.mark.parametrize("cls,prior_type", [(UQDM, "logistic"), (UQDM, "normal"), (GaussianDiffusion, "normal")])
def test_nelbo_terms_match_an_independent_computation(cls, prior_type, tiny_model):
    model = tiny_model(cls, prior_type)
    x_raw = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    torch.manual_seed(7)
    got = model.nelbo(x_raw)
    torch.manual_seed(7)
    latent, diff, recon = replay_nelbo(model, x_raw, prior_type, gaussian=cls is GaussianDiffusion)
    assert torch.allclose(got["latent"], latent, rtol=1e-9)
    assert torch.allclose(got["diffusion"], diff, rtol=1e-7)
    assert torch.allclose(got["recon"], recon, rtol=1e-9)
    assert (diff > 0).all()


def test_unclipped_prior_mean_is_the_eps_form(tiny_model):
    model = tiny_model(clip=False)
    z = torch.randn(1, 3, 8, 8, dtype=D)
    st = model.step(1)
    prior = model.prior(z, st)
    eps, _ = model.network(z, st.gamma_t)
    assert torch.allclose(prior.mean, st.alpha_s / st.alpha_t * (z - st.sigma_t * st.e * eps))


def test_default_base_prior_scale_uses_sigma_s(tiny_model):
    fk, df = tiny_model(base_prior_scale="forward_kernel"), tiny_model(base_prior_scale="default")
    z = torch.randn(1, 3, 8, 8, dtype=D)
    st = fk.step(0)
    ratio = df.prior(z, st).std / fk.prior(z, st).std
    assert torch.allclose(ratio, (st.sigma_s / st.sigma_t).expand_as(ratio))


def test_recon_term_is_small_and_decoder_is_normalised(tiny_model):
    model = tiny_model()
    model.schedule = make_schedule("fixed_linear", -12.3, 6.0).double()
    z0 = torch.randn(2, 3, 4, 4, dtype=D) * 0.5
    probs = model.decoder_logits(z0).exp()
    assert torch.allclose(probs.sum(-1), torch.ones_like(z0))
    x_raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    a0 = torch.sqrt(torch.sigmoid(-model.gamma_at(0.0)))
    exact = model.log_likelihood(x_raw, a0 * to_centered(x_raw).to(D))
    assert (exact > math.log(0.5)).all()  # z_0 = α_0·x decodes x with high probability
    assert torch.equal(model.decode_argmax(a0 * to_centered(x_raw).to(D)), x_raw)


@pytest.mark.parametrize("method", ["denoise", "ancestral", "flow_based"])
def test_reconstructions_are_images_at_every_point(method, tiny_model):
    model = tiny_model()
    z = torch.randn(2, 3, 8, 8, dtype=D)
    for i in range(model.n_timesteps + 1):
        x = model.reconstruct(z, i, method, generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.uint8 and x.shape == z.shape


def test_unknown_reconstruction_is_refused(tiny_model):
    with pytest.raises(ValueError):
        tiny_model().reconstruct(torch.zeros(1, 3, 4, 4, dtype=D), 0, "magic")


def test_gaussian_kl_rate_matches_monte_carlo(tiny_model):
    model = tiny_model(GaussianDiffusion, "normal")
    st = model.step(2)
    mu_q = torch.randn(50_000, dtype=D) * 0.1
    from uqdm.diffusion import Prior

    prior = Prior(torch.zeros_like(mu_q), torch.full_like(mu_q, 0.07), mu_q, mu_q)
    kl = model.step_rate(None, mu_q, prior, st)
    z = mu_q + st.posterior_std * torch.randn_like(mu_q)
    mc = Normal(mu_q, st.posterior_std).log_prob(z) - Normal(0.0, 0.07).log_prob(z)
    assert float(kl.mean()) == pytest.approx(float(mc.mean()), rel=0.02)
