"""Noise schedules γ(t) = −log SNR(t), with σ²(t) = sigmoid(γ(t)) and α²(t) = sigmoid(−γ(t))."""

import torch
from torch import Tensor, nn

SCHEDULES = ("fixed_linear", "learned_linear")


class NoiseSchedule(nn.Module):
    """Base class: maps times `t ∈ [0, 1]` to γ(t); γ must increase with t."""

    def forward(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def gamma_min(self) -> Tensor:
        """γ(0), the log-SNR bound at the data end (learned by `learned_linear`)."""
        return self(torch.zeros(()))

    @property
    def gamma_max(self) -> Tensor:
        """γ(1), the log-SNR bound at the noise end."""
        return self(torch.ones(()))


class FixedLinearSchedule(NoiseSchedule):
    """γ(t) = γ_min + (γ_max − γ_min)·t."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        self.register_buffer("start", torch.tensor(float(gamma_min)))
        self.register_buffer("end", torch.tensor(float(gamma_max)))

    def forward(self, t: Tensor) -> Tensor:
        return self.start + (self.end - self.start) * t


class LearnedLinearSchedule(NoiseSchedule):
    """γ(t) = γ_max + |w|·(t − 1) with γ_max fixed, or γ(t) = b + |w|·t with both learned.

    `w` starts at γ_max − γ_min (and `b` at γ_min), so training starts from the fixed schedule.
    """

    def __init__(self, gamma_min: float, gamma_max: float, fix_gamma_max: bool = True):
        super().__init__()
        self.fix_gamma_max = fix_gamma_max
        self.w = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))
        if fix_gamma_max:
            self.register_buffer("end", torch.tensor(float(gamma_max)))
        else:
            self.b = nn.Parameter(torch.tensor(float(gamma_min)))

    def forward(self, t: Tensor) -> Tensor:
        if self.fix_gamma_max:
            return self.end + self.w.abs() * (t - 1)
        return self.b + self.w.abs() * t


def make_schedule(
    kind: str, gamma_min: float, gamma_max: float, fix_gamma_max: bool = True
) -> NoiseSchedule:
    """Build the schedule named `kind` (one of `SCHEDULES`)."""
    if gamma_max <= gamma_min:
        raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min})")
    if kind == "fixed_linear":
        return FixedLinearSchedule(gamma_min, gamma_max)
    if kind == "learned_linear":
        return LearnedLinearSchedule(gamma_min, gamma_max, fix_gamma_max)
    raise ValueError(f"unknown noise schedule {kind!r}; choose one of {SCHEDULES}")


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """α = √sigmoid(−γ), σ = √sigmoid(γ)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
