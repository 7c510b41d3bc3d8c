"""The one-step NELBO estimator: its direct samples of q against the chain's, and its
unbiasedness (value and gradient) against the chain NELBO."""

import math

import pytest
import torch
from scipy.stats import ks_2samp

from uqdm.diffusion import GaussianDiffusion, UQDM, to_centered
from uqdm.estimators import ForwardMarginals, nelbo, one_step_nelbo, stratified_steps
from uqdm.schedules import alpha_sigma

D = torch.float64


def chain_latents(model, x):
    """z_{t_0} … z_{t_T} by walking q one step at a time, as the chain NELBO does."""
    z = model.sample_top(x)
    out = [z]
    for j in range(model.n_timesteps):
        st = model.step(j)
        z = model.sample_posterior(model.posterior_mean(x, z, st), st)
        out.append(z)
    return out


@pytest.mark.parametrize("T", [1, 3, 8])
def test_closed_form_coefficients_match_the_unrolled_recursion(T, tiny_model):
    model = tiny_model(T=T)
    m = ForwardMarginals.of(model)
    alpha_1, sigma_1 = alpha_sigma(model.gamma_at(1.0))
    A, c, P = [alpha_1], [sigma_1], [torch.zeros(T, dtype=D)]  # coefficients of x, ε and n_j in z_{t_i}
    for j in range(T):  # z_{t_{j+1}} = a·z_{t_j} + b·x + n_j
        st = model.step(j)
        a, b = st.alpha_s * (1 - st.e) / st.alpha_t, st.alpha_s * st.e
        row = a * P[-1]
        row[j] = 1.0
        A.append(a * A[-1] + b), c.append(a * c[-1]), P.append(row)
    alpha_grid = torch.stack([alpha_sigma(model.gamma_at(1 - i / T))[0] for i in range(T + 1)])
    sigma_grid = torch.stack([alpha_sigma(model.gamma_at(1 - i / T))[1] for i in range(T + 1)])
    assert torch.allclose(torch.stack(A), alpha_grid, rtol=1e-12)  # the coefficient of x is α_{t_i}
    assert torch.allclose(m.alpha, alpha_grid, rtol=1e-12)
    assert torch.allclose(m.c, torch.stack(c), rtol=1e-10)
    assert torch.allclose(m.P, torch.stack(P), rtol=1e-10, atol=1e-300)
    var_n = torch.stack([model.step(j).delta ** 2 / 12 for j in range(T)])
    assert torch.allclose(m.c**2 + (m.P**2 * var_n).sum(1), sigma_grid**2, rtol=1e-10)


@pytest.mark.parametrize("cls", [UQDM, GaussianDiffusion])
def test_direct_samples_have_the_chains_distribution_at_every_step(cls, tiny_model):
    T, n = 4, 3000
    model = tiny_model(cls, T=T)
    x = to_centered(torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(1))).to(D)
    x = x.expand(n, -1, -1, -1)
    m = ForwardMarginals.of(model)
    with torch.no_grad():
        torch.manual_seed(2)
        chain = chain_latents(model, x)
        torch.manual_seed(3)
        eps = torch.randn_like(x)
        noise = torch.stack([model.sample_posterior(torch.zeros_like(x), model.step(j)) for j in range(T)])
        for i in range(T + 1):
            direct = m.sample(x, torch.full((n,), i), eps, noise)
            alpha, sigma = alpha_sigma(model.gamma_at(1 - i / T))
            # every dimension's offset from α·x has the same law: pool them into one sample each
            a, b = ((z - alpha * x) / sigma for z in (chain[i], direct))
            for z in (a, b):
                assert float(z.mean()) == pytest.approx(0.0, abs=4 / math.sqrt(z.numel()))
                assert float(z.var()) == pytest.approx(1.0, abs=0.05)
            assert ks_2samp(a[:, 0, 0, 0], b[:, 0, 0, 0]).pvalue > 1e-3, f"step {i}"
            assert ks_2samp(a.flatten()[::7], b.flatten()[::7]).pvalue > 1e-3, f"step {i}"


def test_the_two_sample_check_tells_a_wrong_marginal_apart(tiny_model):
    """The KS check above has power: at T = 1 the chain's z_0 (Gaussian plus a wide uniform) is
    not a Gaussian of the same variance."""
    model = tiny_model(T=1)
    x = torch.zeros(4000, 3, 2, 2, dtype=D)
    torch.manual_seed(0)
    with torch.no_grad():
        z0 = chain_latents(model, x)[-1]
        sigma_0 = alpha_sigma(model.gamma_at(0.0))[1]
    gaussian = sigma_0 * torch.randn_like(z0)
    assert ks_2samp(z0.flatten() / sigma_0, gaussian.flatten() / sigma_0).pvalue < 1e-6


def test_z_s_is_the_next_grid_point_of_the_same_draws(tiny_model):
    model = tiny_model(T=5)
    m = ForwardMarginals.of(model)
    x = torch.rand(6, 3, 4, 4, dtype=D) * 2 - 1
    eps, noise = torch.randn_like(x), torch.randn(5, *x.shape, dtype=D)
    i = torch.tensor([0, 1, 2, 3, 4, 2])
    for b, ib in enumerate(i.tolist()):
        st = model.step(ib)
        z_t = m.sample(x, i, eps, noise)[b]
        z_s = model.posterior_mean(x[b], z_t, st) + noise[ib, b]
        assert torch.allclose(z_s, m.sample(x, i + 1, eps, noise)[b], rtol=1e-10, atol=1e-12)


def test_stratified_steps_are_uniform_and_cover_the_grid():
    T, B = 4, 10
    draws = torch.stack([stratified_steps(B, T, generator=torch.Generator().manual_seed(s)) for s in range(2000)])
    counts = torch.stack([(draws == i).sum(1) for i in range(T)], 1)
    assert ((counts == B // T) | (counts == B // T + 1)).all()  # every step, ⌊B/T⌋ or ⌈B/T⌉ times
    share = (draws[:, 0:1] == torch.arange(T)).double().mean(0)  # one image's step is uniform
    assert torch.allclose(share, torch.full((T,), 1 / T, dtype=D), atol=0.04)


@pytest.mark.parametrize("cls", [UQDM, GaussianDiffusion])
def test_one_step_nelbo_is_unbiased(cls, tiny_model):
    model = tiny_model(cls, T=4)
    x_raw = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    R = 800
    batch = x_raw.repeat(R, 1, 1, 1)
    torch.manual_seed(11)
    with torch.no_grad():
        chain = sum(nelbo(model, batch, "chain").values()).view(R, 2)
        one = sum(nelbo(model, batch, "one_step").values()).view(R, 2)
    se = torch.sqrt(chain.var(0) / R + one.var(0) / R)
    assert (one.var(0) > 0).all()
    assert ((one.mean(0) - chain.mean(0)).abs() < 3 * se).all(), (one.mean(0), chain.mean(0), se)
    # and the check can fail: a one-step estimate without the factor T is far off
    wrong = sum(one_step_nelbo(model, batch)[k] * (1 / 4 if k == "diffusion" else 1) for k in ("latent", "diffusion", "recon"))
    assert ((wrong.view(R, 2).mean(0) - chain.mean(0)).abs() > 10 * se).all()


@pytest.mark.parametrize("cls", [UQDM, GaussianDiffusion])
def test_on_the_chains_draws_the_mean_over_steps_is_the_chain_nelbo_and_its_gradient(cls, tiny_model):
    """Given the chain's draws (same seed), averaging T·rate_i over i gives the chain's diffusion
    term, and the same gradient: unbiasedness without sampling error."""
    T = 4
    model = tiny_model(cls, T=T)
    x_raw = torch.randint(0, 256, (3, 3, 4, 4), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    params = [model.schedule.w, model.network.conv_in.weight]

    def value_and_grad(fn):
        torch.manual_seed(9)
        terms = fn()
        value = sum(terms.values())
        return value.detach(), torch.autograd.grad(value.sum(), params)

    chain, chain_grad = value_and_grad(lambda: model.nelbo(x_raw))
    per_step = [value_and_grad(lambda: one_step_nelbo(model, x_raw, torch.full((3,), i))) for i in range(T)]
    mean = sum(v for v, _ in per_step) / T
    assert torch.allclose(mean, chain, rtol=1e-10)
    for k, g in enumerate(chain_grad):
        assert torch.allclose(sum(grads[k] for _, grads in per_step) / T, g, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(per_step[0][0], per_step[-1][0])  # the steps do differ


def test_one_step_gradient_is_unbiased(tiny_model):
    model = tiny_model(T=4)
    x_raw = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    net = model.network
    watched = {  # a few network weights on the path to ε̂ and the prior scale, and the schedule
        "conv_in": lambda: net.conv_in.weight.grad.flatten()[:2],
        "schedule_w": lambda: model.schedule.w.grad.view(1),
    }
    last = [p for p in net.parameters() if p.dim() == 4][-1]
    watched["conv_out"] = lambda: last.grad.flatten()[:3]

    def gradients(estimator, passes=80, replicas=16):
        torch.manual_seed({"chain": 1, "one_step": 2}[estimator])
        samples = []
        for _ in range(passes):
            model.zero_grad()
            loss = sum(nelbo(model, x_raw.repeat(replicas, 1, 1, 1), estimator).values()).mean()
            loss.backward()
            samples.append(torch.cat([g() for g in watched.values()]))
        return torch.stack(samples)

    chain, one = gradients("chain"), gradients("one_step")
    se = torch.sqrt(chain.var(0) / len(chain) + one.var(0) / len(one))
    assert (chain.mean(0).abs() > 3 * se).any()  # some gradient is clearly non-zero: the check means something
    assert ((one.mean(0) - chain.mean(0)).abs() < 3 * se).all(), (one.mean(0), chain.mean(0), se)


def test_unknown_estimator_is_refused(tiny_model):
    with pytest.raises(ValueError, match="one_step"):
        nelbo(tiny_model(T=1), torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "two_step")
