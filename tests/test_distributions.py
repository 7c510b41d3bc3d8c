import math

import pytest
import torch

from uqdm.walk import universal_quantize
from uqdm.distributions import base_distribution, log_interval_mass, log_prob_uniform_convolved

D = torch.float64


def naive_cdf(prior_type, x, std):
    if prior_type == "logistic":
        return torch.sigmoid(x / (std * math.sqrt(3) / math.pi))
    return 0.5 * (1 + torch.erf(x / (std * math.sqrt(2))))


@pytest.mark.parametrize("prior_type", ["logistic", "normal"])
def test_interval_mass_matches_cdf_difference(prior_type):
    std = torch.tensor(0.7, dtype=D)
    lo = torch.linspace(-3, 2.5, 23, dtype=D)
    hi = lo + 0.4
    g = base_distribution(prior_type, std)
    expected = torch.log(naive_cdf(prior_type, hi, std) - naive_cdf(prior_type, lo, std))
    assert torch.allclose(log_interval_mass(g, lo, hi), expected, rtol=1e-10)


@pytest.mark.parametrize("prior_type", ["logistic", "normal"])
def test_interval_mass_is_finite_far_in_both_tails(prior_type):
    g = base_distribution(prior_type, torch.tensor(1.0))
    lo = torch.tensor([-40.0, 30.0, 7.0])
    out = log_interval_mass(g, lo, lo + 0.5)
    assert torch.isfinite(out).all()
    assert (out < -5).all()
    # symmetric: the mass of [a, b] equals the mass of [−b, −a]
    assert torch.allclose(out, log_interval_mass(g, -lo - 0.5, -lo))


@pytest.mark.parametrize("prior_type", ["logistic", "normal"])
def test_logistic_and_normal_have_the_requested_std(prior_type):
    std = torch.tensor(0.3, dtype=D)
    g = base_distribution(prior_type, std)
    x = torch.linspace(-6, 6, 20001, dtype=D)
    cdf = torch.exp(g.log_cdf(x))
    density = torch.diff(cdf) / torch.diff(x)
    mid = (x[1:] + x[:-1]) / 2
    var = float((density * mid**2 * torch.diff(x)).sum())
    assert var == pytest.approx(0.09, rel=1e-3)


def test_unknown_prior_is_refused():
    with pytest.raises(ValueError):
        base_distribution("laplace", torch.tensor(1.0))


@pytest.mark.parametrize("prior_type", ["logistic", "normal"])
def test_quantized_prior_mass_sums_to_one(prior_type):
    """Σ_k P(k) = 1 for P(k) = G((k − u + ½)Δ) − G((k − u − ½)Δ), any dither u."""
    g = base_distribution(prior_type, torch.tensor(0.8, dtype=D))
    delta = torch.tensor(0.35, dtype=D)
    k = torch.arange(-200, 201, dtype=D)[:, None]
    u = torch.rand(7, dtype=D) - 0.5
    logp = log_prob_uniform_convolved(g, (k - u) * delta, delta)
    assert torch.allclose(logp.exp().sum(0), torch.ones(7, dtype=D), atol=1e-12)


def test_universal_quantization_gives_an_exact_sample_of_q():
    """z_s = μ_p + (k − u)Δ is Uniform(μ_q ± Δ/2): mean μ_q, variance Δ²/12, and never outside."""
    torch.manual_seed(0)
    n = 200_000
    mu_q, mu_p, delta = torch.tensor(0.37, dtype=D), torch.tensor(-1.2, dtype=D), torch.tensor(0.25, dtype=D)
    u = torch.rand(n, dtype=D) - 0.5
    k, z = universal_quantize(mu_q.expand(n), mu_p, delta, u)
    assert torch.equal(k, k.round())
    assert float(z.mean()) == pytest.approx(0.37, abs=3 * 0.25 / math.sqrt(12 * n))
    assert float(z.var()) == pytest.approx(0.25**2 / 12, rel=0.02)
    assert float((z - mu_q).abs().max()) <= 0.125 + 1e-12


@pytest.mark.parametrize("prior_type", ["logistic", "normal"])
def test_expected_code_length_is_kl(prior_type):
    """E_u[−log P(k)] = KL(q ‖ p) because H(q) = log Δ (checked by quadrature)."""
    torch.manual_seed(1)
    mu_q, delta = torch.tensor(0.3, dtype=D), torch.tensor(0.5, dtype=D)
    g = base_distribution(prior_type, torch.tensor(0.4, dtype=D))
    u = torch.rand(400_000, dtype=D) - 0.5
    k, z = universal_quantize(mu_q.expand_as(u), torch.tensor(0.0, dtype=D), delta, u)
    rate = -log_prob_uniform_convolved(g, (k - u) * delta, delta).mean()
    zs = mu_q + delta * (torch.linspace(-0.5, 0.5, 100_001, dtype=D))
    kl = -log_prob_uniform_convolved(g, zs, delta).mean()  # E_q[log q − log p] with q = 1/Δ
    assert float(rate) == pytest.approx(float(kl), rel=5e-3)
