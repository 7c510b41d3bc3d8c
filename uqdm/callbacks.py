"""Training callbacks: the paper's EMA and a summary of where a run went and how far it got."""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from .rng import seeded


def ema_decay(n: int, decay: float, warmup: bool = True) -> float:
    """The decay of the n-th update (n ≥ 1): min(decay, (1 + n)/(10 + n)) with the warm-up."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def ema_update(decay: float = 0.9999, warmup: bool = True):
    """The `multi_avg_fn` of `torch.optim.swa_utils.AveragedModel` for the EMA: all floating-point
    tensors in one `torch._foreach_lerp_`, avg ← avg + (1 − d_n)·(w − avg) with d_n = `ema_decay`
    (one host read of the update count per step); integer buffers, if any, are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        rate = ema_decay(int(n_averaged) + 1, decay, warmup)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - rate)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    return update


class EMA(WeightAveraging):
    """Exponential moving average of every parameter (the network's and the learned schedule's)
    through Lightning's weight-averaging machinery, with the paper's warm-up of the decay.

    After n updates the decay is min(decay, (1 + n)/(10 + n)), so a short run validates and saves
    averaged weights that have moved away from the initial ones. Lightning's `EMAWeightAveraging`
    uses a constant decay; this is the same callback with the warm-up added. Validation and saved
    checkpoints use the averaged weights. One update is one fused `torch._foreach_lerp_` over all
    tensors (`ema_update`), not one host synchronisation per tensor.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True):
        super().__init__(multi_avg_fn=ema_update(decay, warmup))
        self.decay = decay


class TrainingSummary(Callback):
    """Measures validation bpd before the first step and prints it next to the final one, with
    the paths of the checkpoints and logs."""

    def __init__(self):
        self.start_bpd: float | None = None

    @torch.no_grad()
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.val_dataloaders
        if loaders is None or self.start_bpd is not None:
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        mean = MeanMetric().to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        for batch_idx, batch in enumerate(loader):
            with seeded(batch_idx), trainer.precision_plugin.val_step_context():
                bpd = pl_module.bits_per_dim(batch.to(pl_module.device))["bpd"]
            mean.update(bpd, weight=batch.shape[0])
        pl_module.train(was_training)
        self.start_bpd = float(mean.compute())

    def state_dict(self) -> dict:
        return {"start_bpd": self.start_bpd}

    def load_state_dict(self, state_dict: dict) -> None:
        self.start_bpd = state_dict.get("start_bpd")

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = trainer.callback_metrics.get("val/bpd")
        label = " (theoretical rate)" if getattr(pl_module, "rate_is_theoretical", False) else ""
        if self.start_bpd is not None and final is not None:
            final = float(final)
            change = 100.0 * (final - self.start_bpd) / self.start_bpd
            print(f"validation bpd{label}: {self.start_bpd:.4f} at step 0 -> {final:.4f} "
                  f"at step {trainer.global_step} ({change:+.1f}%)")
        for ckpt in trainer.checkpoint_callbacks:
            path = ckpt.last_model_path or ckpt.best_model_path
            kind = "last" if ckpt.last_model_path else f"best by {ckpt.monitor}" if ckpt.monitor else "latest"
            print(f"checkpoint ({kind}): {path}")
        if trainer.logger is not None:
            print(f"logs: {trainer.logger.save_dir} ({type(trainer.logger).__name__})")
