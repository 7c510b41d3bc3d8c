import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from uqdm.diffusion import to_centered
from uqdm.errors import UQDMError
from uqdm.network import Attention, NetworkConfig, ScoreNetwork, fourier_features
from uqdm.released import network_config, read_released
from uqdm.weights import safe_load

PRESETS = {  # embedding_dim, n_blocks, norm_groups
    "tiny": (32, 1, 8),
    "small": (64, 8, 16),
    "medium": (256, 32, 32),
    "big": (256, 64, 32),
}


@pytest.fixture
def tiny(released_dir):
    """The released tiny network (raw weights), in eval mode, and its checkpoint."""
    config, checkpoint = read_released(released_dir)
    net = ScoreNetwork(network_config(config))
    net.load_state_dict(checkpoint["model"], strict=True)
    return net.eval(), checkpoint


def perturb(net, std=0.05, seed=0):
    """Make the zero-initialised layers non-zero so that every path of the network matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def test_released_weights_load_strictly(tiny):
    net, checkpoint = tiny
    assert sum(p.numel() for p in net.parameters()) == 167_494
    assert set(net.state_dict()) == set(checkpoint["model"])
    shadow = checkpoint["ema"]["shadow_params"]
    assert len(shadow) == len(checkpoint["model"]) + 1
    assert [s.shape for s in shadow[:-1]] == [p.shape for p in checkpoint["model"].values()]


def test_released_weights_outputs(tiny):
    net, _ = tiny
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps_hat, scale = net(z, torch.tensor([-7.5, 6.0]))
        eps_scalar, scale_scalar = net(z, torch.tensor(1.5))
        eps_batch, scale_batch = net(z, torch.tensor([1.5, 1.5]))
    assert eps_hat.shape == scale.shape == z.shape
    assert torch.isfinite(eps_hat).all() and torch.isfinite(scale).all()
    assert (scale > 0).all()
    torch.testing.assert_close(eps_scalar, eps_batch)
    torch.testing.assert_close(scale_scalar, scale_batch)


def test_released_weights_denoise(tiny, kodak64):
    """At γ = −3 the trained network predicts the noise far better than the identity guess ε̂ = z."""
    net, _ = tiny
    x = to_centered(torch.stack(kodak64[:4]))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    gamma = torch.tensor(-3.0)
    z = torch.sigmoid(-gamma).sqrt() * x + torch.sigmoid(gamma).sqrt() * eps
    with torch.no_grad():
        eps_hat, _ = net(z, gamma)
    mse, baseline = (eps_hat - eps).pow(2).mean().item(), (z - eps).pow(2).mean().item()
    assert mse < 0.3 < baseline, (mse, baseline)


def test_sdpa_matches_einsum_on_released_weights(tiny, released_dir, kodak64):
    net, checkpoint = tiny
    config, _ = read_released(released_dir)
    oracle = ScoreNetwork(network_config(config), attention="einsum").eval()
    oracle.load_state_dict(checkpoint["model"], strict=True)
    z = to_centered(torch.stack(kodak64[:2])) + 0.1 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([-3.0, 1.5])
    with torch.no_grad():
        for a, b in zip(net(z, gamma), oracle(z, gamma)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_multihead_attention_matches_per_head_loop():
    qkv = torch.randn(2, 3 * 8, 4, 5, generator=torch.Generator().manual_seed(0))
    q, k, v = (t.reshape(2, 8, 20) for t in qkv.chunk(3, dim=1))
    heads = []
    for h in range(2):
        qh, kh, vh = (t[:, 4 * h : 4 * h + 4] for t in (q, k, v))
        weight = torch.softmax(qh.transpose(1, 2) @ kh / math.sqrt(4), dim=-1)
        heads.append(vh @ weight.transpose(1, 2))
    expected = torch.cat(heads, dim=1).reshape(2, 8, 4, 5)
    for kind in ("sdpa", "einsum"):
        torch.testing.assert_close(Attention(2, kind)(qkv), expected)


def test_attention_everywhere_sdpa_matches_einsum():
    kwargs = dict(embedding_dim=16, n_blocks=2, norm_groups=4, attention_everywhere=True, n_attention_heads=2)
    torch.manual_seed(0)
    net = perturb(ScoreNetwork(NetworkConfig(**kwargs)))
    oracle = ScoreNetwork(NetworkConfig(**kwargs), attention="einsum")
    oracle.load_state_dict(net.state_dict(), strict=True)
    assert any(".attention_block." in name for name in net.state_dict())
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(net(z, torch.tensor(0.0)), oracle(z, torch.tensor(0.0))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fresh_network_is_identity():
    net = ScoreNetwork()
    z = torch.randn(2, 3, 8, 8)
    eps_hat, scale = net(z, torch.tensor([-12.3, 6.0]))
    assert torch.equal(eps_hat, z)
    assert torch.equal(scale, torch.ones_like(z))
    assert sum(p.numel() for p in net.parameters()) == 167_494


def test_without_learned_prior_scale():
    net = perturb(ScoreNetwork(NetworkConfig(learned_prior_scale=False, use_fourier_features=False)))
    assert net.conv_out[-1].out_channels == 3 and net.conv_in.in_channels == 3
    eps_hat, scale = net(torch.randn(1, 3, 8, 8), torch.tensor(0.0))
    assert scale is None and eps_hat.shape == (1, 3, 8, 8)


def test_fourier_features_frequency_major():
    z = torch.randn(2, 3, 4, 5)
    features = fourier_features(z, (5, 6))
    assert features.shape == (2, 12, 4, 5)
    for f, n in enumerate((5, 6)):
        for c in range(3):
            angle = 2 * math.pi * 2**n * z[:, c].double()
            torch.testing.assert_close(features[:, f * 3 + c].double(), angle.sin(), atol=1e-4, rtol=0)
            torch.testing.assert_close(features[:, 6 + f * 3 + c].double(), angle.cos(), atol=1e-4, rtol=0)


def test_network_config_of_released_weights(released_dir):
    config = json.loads((released_dir / "config.json").read_text())
    kwargs = dataclasses.asdict(network_config(config))
    assert kwargs["dropout"] == 0.0 and "dropout_prob" not in kwargs
    assert (kwargs["embedding_dim"], kwargs["n_blocks"], kwargs["norm_groups"]) == PRESETS["tiny"]
    assert (kwargs["gamma_min"], kwargs["gamma_max"]) == (-12.3, 6.0)


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_safe_load_refuses_arbitrary_global(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCommand(f"touch {marker}")}, path)
    with pytest.raises(UQDMError, match="system") as info:
        safe_load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_safe_load_refuses_numpy_arrays(tmp_path):
    path = tmp_path / "array.pt"
    torch.save({"x": np.zeros(3)}, path)
    with pytest.raises(UQDMError, match="forbidden global"):
        safe_load(path)


def test_safe_load_bad_files(tmp_path):
    with pytest.raises(UQDMError, match="not found"):
        safe_load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UQDMError, match="not a torch checkpoint"):
        safe_load(tmp_path / "junk.pt")
    with pytest.raises(UQDMError, match="config.json"):
        read_released(tmp_path)


def test_safe_load_released_checkpoint(released_dir):
    _, checkpoint = read_released(released_dir)
    assert set(checkpoint) == {"model", "ema", "optimizer", "step"}
    assert checkpoint["step"] == 500_000
    assert checkpoint["ema"]["shadow_params"][-1].item() == pytest.approx(17.9658, abs=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameter_counts(preset):
    embedding_dim, n_blocks, norm_groups = PRESETS[preset]
    with torch.device("meta"):
        net = ScoreNetwork(NetworkConfig(embedding_dim=embedding_dim, n_blocks=n_blocks, norm_groups=norm_groups))
    count = sum(p.numel() for p in net.parameters())
    print(f"uqdm-{preset}: {count:,} parameters")
    assert count > 0
    if preset == "tiny":
        assert count == 167_494
