"""The LightningModule: builds the network, schedule and objective from flat hyperparameters,
logs the NELBO's terms in bits per dimension, and sets up Adam with a linear warm-up."""

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .diffusion import DIFFUSIONS, GaussianDiffusion, UQDM
from .network import ScoreNetwork
from .rng import seeded
from .schedules import make_schedule


class UQDMModule(L.LightningModule):
    """A UQDM (or its Gaussian twin) trained on its NELBO, the expected size of its bitstream.

    Model: `n_timesteps` (T), `diffusion` ("uniform": UQDM; "gaussian": the Gaussian-diffusion
    comparison, whose rate is theoretical), `prior_type`, `base_prior_scale`,
    `learned_prior_scale`, `clip_prior_mean`, `noise_schedule`, `fix_gamma_max`,
    `gamma_min`/`gamma_max`. Network: see `uqdm.network.ScoreNetwork`.
    Optimiser: Adam(`lr`, (`beta1`, `beta2`), `eps`, `weight_decay`), learning rate ramped
    linearly from 0 over `warmup` steps. Gradient clipping and precision are Trainer options.
    """

    def __init__(
        self,
        n_timesteps: int = 4,
        diffusion: str = "uniform",
        prior_type: str = "logistic",
        base_prior_scale: str = "forward_kernel",
        learned_prior_scale: bool = True,
        clip_prior_mean: bool = True,
        noise_schedule: str = "learned_linear",
        fix_gamma_max: bool = True,
        gamma_min: float = -12.3,
        gamma_max: float = 6.0,
        embedding_dim: int = 32,
        n_blocks: int = 1,
        norm_groups: int = 8,
        attention_everywhere: bool = False,
        n_attention_heads: int = 1,
        use_fourier_features: bool = True,
        dropout: float = 0.0,
        n_channels: int = 3,
        lr: float = 2e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup: int = 1000,
    ):
        super().__init__()
        if diffusion not in DIFFUSIONS:
            raise ValueError(f"unknown diffusion {diffusion!r}; choose one of {DIFFUSIONS}")
        self.save_hyperparameters()
        network = ScoreNetwork(
            n_channels=n_channels,
            embedding_dim=embedding_dim,
            n_blocks=n_blocks,
            norm_groups=norm_groups,
            attention_everywhere=attention_everywhere,
            n_attention_heads=n_attention_heads,
            use_fourier_features=use_fourier_features,
            dropout=dropout,
            learned_prior_scale=learned_prior_scale,
            gamma_min=gamma_min,
            gamma_max=gamma_max,
        )
        schedule = make_schedule(noise_schedule, gamma_min, gamma_max, fix_gamma_max)
        objective = UQDM if diffusion == "uniform" else GaussianDiffusion
        self.model = objective(
            network,
            schedule,
            n_timesteps=n_timesteps,
            prior_type="normal" if diffusion == "gaussian" else prior_type,
            base_prior_scale=base_prior_scale,
            clip_prior_mean=clip_prior_mean,
        )
        if diffusion == "gaussian":
            rank_zero_warn(
                "Gaussian diffusion: its bpd is the theoretical KL rate; no practical coder reaches it."
            )

    @property
    def rate_is_theoretical(self) -> bool:
        """True for the Gaussian model, whose rate no real bitstream achieves."""
        return self.hparams.diffusion == "gaussian"

    def bits_per_dim(self, x_raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """The NELBO and its terms in bits per dimension, averaged over the batch."""
        terms = self.model.nelbo(x_raw)
        scale = 1.0 / (x_raw[0].numel() * math.log(2))
        out = {f"bpd_{name}": value.mean() * scale for name, value in terms.items()}
        out["bpd_diff"] = out.pop("bpd_diffusion")
        out["bpd"] = out["bpd_latent"] + out["bpd_diff"] + out["bpd_recon"]
        return out

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """`stage/bpd` (on the progress bar) and `stage/bpd_latent|diff|recon`."""
        per_step = stage == "train"
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "bpd", on_step=per_step,
                     on_epoch=not per_step, batch_size=batch_size, sync_dist=not per_step)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        terms = self.bits_per_dim(batch)
        self._log_terms("train", terms, batch.shape[0])
        self.log("gamma_min", self.model.schedule.gamma_min.detach(), on_step=True)
        return terms["bpd"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        with seeded(batch_idx):  # the same noise every validation, so epochs compare
            terms = self.bits_per_dim(batch)
        self._log_terms("val", terms, batch.shape[0])

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        with seeded(batch_idx):
            terms = self.bits_per_dim(batch)
        self._log_terms("test", terms, batch.shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(
            self.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay
        )
        ramp = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, step / hp.warmup) if hp.warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}
