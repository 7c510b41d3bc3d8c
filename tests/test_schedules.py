import math

import pytest
import torch

from uqdm.schedules import FixedLinearSchedule, LearnedLinearSchedule, alpha_sigma, make_schedule


def test_fixed_linear_endpoints_and_linearity():
    g = make_schedule("fixed_linear", -12.3, 6.0)
    t = torch.linspace(0, 1, 5)
    assert torch.allclose(g(t), -12.3 + 18.3 * t)
    assert isinstance(g, FixedLinearSchedule)
    assert not list(g.parameters())


def test_learned_linear_with_fixed_gamma_max_learns_only_gamma_min():
    g = make_schedule("learned_linear", -12.3, 6.0, fix_gamma_max=True)
    assert isinstance(g, LearnedLinearSchedule)
    assert [n for n, _ in g.named_parameters()] == ["w"]
    assert float(g.gamma_min) == pytest.approx(-12.3, abs=1e-5)
    with torch.no_grad():
        g.w.fill_(-17.9658)  # |w| is used, as in the paper's code
    assert float(g.gamma_max) == pytest.approx(6.0)
    assert float(g.gamma_min) == pytest.approx(6.0 - 17.9658, abs=1e-4)


def test_learned_linear_free_both_ends_gets_gradients():
    g = make_schedule("learned_linear", -10.0, 5.0, fix_gamma_max=False)
    assert sorted(n for n, _ in g.named_parameters()) == ["b", "w"]
    g(torch.tensor(0.3)).backward()
    assert g.w.grad == pytest.approx(0.3) and g.b.grad == pytest.approx(1.0)


def test_alpha_sigma_variance_preserving_and_snr():
    gamma = torch.linspace(-12, 6, 7, dtype=torch.float64)
    alpha, sigma = alpha_sigma(gamma)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(gamma))
    assert torch.allclose(torch.log(alpha**2 / sigma**2), -gamma)


@pytest.mark.parametrize("bad", [dict(kind="cosine", gamma_min=-1, gamma_max=1), dict(kind="fixed_linear", gamma_min=2, gamma_max=1)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        make_schedule(bad["kind"], bad["gamma_min"], bad["gamma_max"])


def test_schedule_constant_e_matches_snr_ratio():
    # e = 1 − exp(γ_s − γ_t) = 1 − SNR_t/SNR_s
    g = make_schedule("fixed_linear", -12.3, 6.0)
    gt, gs = g(torch.tensor(0.75)), g(torch.tensor(0.5))
    e = -torch.expm1(gs - gt)
    assert float(e) == pytest.approx(1 - math.exp(float(gs - gt)))
