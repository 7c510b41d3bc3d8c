"""The single-resolution VDM score network used by UQDM.

Its hyperparameters are declared once, in `NetworkConfig`. Parameter names and shapes match the
weights released with the paper, so
``ScoreNetwork(released.network_config(config)).load_state_dict(ckpt["model"])`` works as is.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (the block then starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """``[sin(t·ω), cos(t·ω)]`` with ``ω`` log-spaced from 1 to ``1/max_period`` over ``dim/2`` entries."""
    half = dim // 2
    omega = torch.logspace(0, -math.log10(max_period), half, device=t.device, dtype=t.dtype)
    args = t[:, None] * omega
    return torch.cat([args.sin(), args.cos()], dim=1)


def fourier_features(z: Tensor, exponents: tuple[int, ...] = (5, 6)) -> Tensor:
    """``[sin F, cos F]`` with ``F = 2π·2^n·z``, flattened frequency-major (channel ``f·C + c``)."""
    freqs = 2 * math.pi * 2.0 ** torch.tensor(exponents, device=z.device, dtype=z.dtype)
    f = (freqs[:, None, None, None] * z[:, None]).flatten(1, 2)
    return torch.cat([f.sin(), f.cos()], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a ``(B, 3·C, H, W)`` qkv map.

    ``softmax(q·kᵀ / √d)·v`` per head of width ``d = C / n_heads``; ``einsum`` is the paper's explicit
    form (q and k each scaled by ``d^(−1/4)``), ``sdpa`` the fused PyTorch kernel.
    """

    def __init__(self, n_heads: int = 1, kind: str = "sdpa"):
        super().__init__()
        if kind not in ("sdpa", "einsum"):
            raise ValueError(f"attention must be 'sdpa' or 'einsum', got {kind!r}")
        self.n_heads, self.kind = n_heads, kind

    def forward(self, qkv: Tensor) -> Tensor:
        b, c3, h, w = qkv.shape
        q, k, v = (x.reshape(b, self.n_heads, -1, h * w) for x in qkv.chunk(3, dim=1))
        if self.kind == "sdpa":
            # tokens-major and contiguous: the layout the fused CPU and GPU kernels take
            q, k, v = (x.transpose(-1, -2).contiguous() for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
        else:
            scale = q.shape[2] ** -0.25
            weight = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
            weight = weight.float().softmax(dim=-1).to(v.dtype)
            out = torch.einsum("bhts,bhcs->bhct", weight, v)
        return out.reshape(b, c3 // 3, h, w)


class AttentionBlock(nn.Module):
    """``x + Conv1×1(Attention(Conv1×1(GroupNorm(x))))``, the last conv zero-initialised."""

    def __init__(self, channels: int, n_heads: int = 1, norm_groups: int = 8, attention: str = "sdpa"):
        super().__init__()
        self.layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels),
            nn.Conv2d(channels, 3 * channels, 1),
            Attention(n_heads, attention),
            zero_init(nn.Conv2d(channels, channels, 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class ResnetBlock(nn.Module):
    """``skip(x) + net2(net1(x) + cond_proj(c))``, the conditioning added per channel."""

    def __init__(self, ch_in: int, ch_out: int, cond_dim: int, norm_groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.net1 = nn.Sequential(nn.GroupNorm(norm_groups, ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.cond_proj = zero_init(nn.Linear(cond_dim, ch_out, bias=False))
        self.net2 = nn.Sequential(
            nn.GroupNorm(norm_groups, ch_out),
            nn.SiLU(),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
            zero_init(nn.Conv2d(ch_out, ch_out, 3, padding=1)),
        )
        self.skip_conv = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.net1(x) + self.cond_proj(cond)[:, :, None, None]
        return self.skip_conv(x) + self.net2(h)


class UpDownBlock(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, resnet_block: ResnetBlock, attention_block: AttentionBlock | None = None):
        super().__init__()
        self.resnet_block = resnet_block
        self.attention_block = attention_block if attention_block is not None else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.attention_block(self.resnet_block(x, cond))


@dataclass(frozen=True)
class NetworkConfig:
    """The score network's hyperparameters: `UQDMModule` takes them as flat arguments
    (``--model.embedding_dim=64``), the released weights' importer reads them from ``config.json``
    and the codec's fingerprint covers them.

    Args:
        n_channels: image channels ``C``.
        embedding_dim: width ``E`` of every block; the conditioning MLP has width ``4E``.
        n_blocks: residual blocks on the way down.
        norm_groups: GroupNorm groups.
        attention_everywhere: add self-attention after every down and up residual block.
        n_attention_heads: heads of every self-attention.
        use_fourier_features: concatenate ``sin/cos(2π·2^n·z)``, ``n ∈ {5, 6}``, to the input.
        dropout: dropout probability inside the residual blocks.
        learned_prior_scale: output the prior-scale factor (else it is ``None``).
        gamma_min: γ at t = 0; it also normalises the conditioning ``t' = (γ_t − γ_min)/(γ_max − γ_min)``.
        gamma_max: γ at t = 1; see ``gamma_min``.
    """

    n_channels: int = 3
    embedding_dim: int = 32
    n_blocks: int = 1
    norm_groups: int = 8
    attention_everywhere: bool = False
    n_attention_heads: int = 1
    use_fourier_features: bool = True
    dropout: float = 0.0
    learned_prior_scale: bool = True
    gamma_min: float = -12.3
    gamma_max: float = 6.0


class ScoreNetwork(nn.Module):
    """VDM score network: predicts the noise ``ε̂(z_t, γ_t)`` and, optionally, a prior-scale factor.

    All blocks work at full resolution with ``embedding_dim`` channels: ``n_blocks`` residual blocks
    down, residual–attention–residual in the middle, ``n_blocks + 1`` up with skip concatenation.
    The head outputs ``2·C`` channels: ``ε̂ = out[:, :C] + z`` and
    ``scale = softplus(out[:, C:] + log(e − 1))`` (exactly 1 at initialisation).

    Args:
        config: the hyperparameters (`NetworkConfig`).
        attention: ``"sdpa"`` (fused kernel) or ``"einsum"`` (explicit, the paper's form).
    """

    fourier_exponents = (5, 6)

    def __init__(self, config: NetworkConfig = NetworkConfig(), attention: str = "sdpa"):
        super().__init__()
        self.config = config
        n_channels, norm_groups = config.n_channels, config.norm_groups
        E, cond_dim = config.embedding_dim, 4 * config.embedding_dim

        def resnet(ch_in: int = E) -> ResnetBlock:
            return ResnetBlock(ch_in, E, cond_dim, norm_groups, config.dropout)

        def attn() -> AttentionBlock:
            return AttentionBlock(E, config.n_attention_heads, norm_groups, attention)

        def block(ch_in: int = E) -> UpDownBlock:
            return UpDownBlock(resnet(ch_in), attn() if config.attention_everywhere else None)

        self.embed_conditioning = nn.Sequential(
            nn.Linear(E, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim), nn.SiLU()
        )
        n_fourier = 2 * len(self.fourier_exponents) * n_channels if config.use_fourier_features else 0
        self.conv_in = nn.Conv2d(n_channels + n_fourier, E, 3, padding=1)
        self.down_blocks = nn.ModuleList(block() for _ in range(config.n_blocks))
        self.mid_resnet_block_1 = resnet()
        self.mid_attn_block = attn()
        self.mid_resnet_block_2 = resnet()
        self.up_blocks = nn.ModuleList(block(2 * E) for _ in range(config.n_blocks + 1))
        n_out = 2 * n_channels if config.learned_prior_scale else n_channels
        self.conv_out = nn.Sequential(
            nn.GroupNorm(norm_groups, E), nn.SiLU(), zero_init(nn.Conv2d(E, n_out, 3, padding=1))
        )

    @property
    def n_channels(self) -> int:
        """Image channels ``C``."""
        return self.config.n_channels

    def condition(self, gamma_t: Tensor, batch_size: int, dtype: torch.dtype) -> Tensor:
        """``MLP(embed(1000·(γ_t − γ_min)/(γ_max − γ_min)))``, one row per batch element."""
        gamma_t = torch.as_tensor(gamma_t, device=self.conv_in.weight.device)
        gamma_t = gamma_t.to(torch.promote_types(gamma_t.dtype, torch.float32)).reshape(-1).expand(batch_size)
        t = (gamma_t - self.config.gamma_min) / (self.config.gamma_max - self.config.gamma_min)
        return self.embed_conditioning(timestep_embedding(1000 * t, self.config.embedding_dim).to(dtype))

    def forward(self, z: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return ``(ε̂, scale_factor)`` for ``z`` of shape ``(B, C, H, W)`` and ``γ_t`` scalar or ``(B,)``."""
        cond = self.condition(gamma_t, z.shape[0], z.dtype)
        h = torch.cat([z, fourier_features(z, self.fourier_exponents)], dim=1) if self.config.use_fourier_features else z
        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, cond)
            skips.append(h)
        h = self.mid_resnet_block_1(h, cond)
        h = self.mid_attn_block(h)
        h = self.mid_resnet_block_2(h, cond)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
        out = self.conv_out(h)
        eps_hat = out[:, : self.n_channels] + z
        if not self.config.learned_prior_scale:
            return eps_hat, None
        return eps_hat, F.softplus(out[:, self.n_channels :] + math.log(math.e - 1))
