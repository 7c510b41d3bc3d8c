"""The LightningModule: builds the model from flat hyperparameters (`build_model`), logs the
NELBO's terms in bits per dimension, and trains it with Adam, a linear warm-up and gradient
clipping, stepping the optimiser itself (Lightning's manual optimisation) so that a non-finite step
can be skipped."""

import math
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .diffusion import GaussianDiffusion
from .errors import UQDMError
from .estimators import ESTIMATORS, nelbo
from .hyperparameters import build_model
from .rng import seeded
from .weights import safe_load

CLIP_ALGORITHMS = ("norm", "value")
_AUTOMATIC_STEPS = "epoch_loop.automatic_optimization.optim_progress"  # in a checkpoint's fit_loop state
_MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"


def carry_automatic_step_count(checkpoint: dict) -> int:
    """A checkpoint written while uqdm trained with automatic optimisation (before it stepped the
    optimiser itself) keeps its optimiser-step count where that mode counts; copy it to where
    manual optimisation counts, so that a resumed run continues its `global_step` instead of
    restarting it at 0. Returns the steps carried over (0: nothing to do)."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    automatic, manual = loop.get(_AUTOMATIC_STEPS), loop.get(_MANUAL_STEPS)
    if not automatic or not manual or manual["total"]["completed"]:
        return 0
    steps = automatic["optimizer"]["step"]
    loop[_MANUAL_STEPS] = {"total": dict(steps["total"]), "current": dict(steps["current"])}
    return int(steps["total"]["completed"])


class UQDMModule(L.LightningModule):
    """A UQDM (or its Gaussian twin) trained on its NELBO, the expected size of its bitstream.

    Model: the arguments of `uqdm.hyperparameters.build_model` (`n_timesteps`, `diffusion`, the
    prior, the schedule) and the fields of `uqdm.network.NetworkConfig`, all flat
    (``--model.embedding_dim=64``). Optimiser: Adam(`lr`, (`beta1`, `beta2`), `eps`,
    `weight_decay`), learning rate ramped linearly from 0 over `warmup` steps, gradients clipped to
    `gradient_clip_val` by `gradient_clip_algorithm` ("norm": their global 2-norm, "value": each
    element; None or 0: no clipping). Precision is a Trainer option.

    `estimator`: how a training step estimates the NELBO (`uqdm.estimators`): "chain" walks all T
    steps (the paper's, T network calls per image), "one_step" samples one step per image (one
    network call whatever T). Either way ``train/bpd`` estimates the same NELBO; validation, test
    and the step-0 figure are always the full chain. `init_from`: a checkpoint (training's or
    `uqdm import-official`'s) whose weights and schedule a new fit starts from, read weights-only,
    with a fresh optimiser and step count (ignored when resuming with ``--ckpt_path``).

    The module steps the optimiser itself (Lightning's manual optimisation, `training_step`), so
    the Trainer's `gradient_clip_val`, `gradient_clip_algorithm` and `accumulate_grad_batches` do
    not apply (`check_trainer` refuses them). A training step whose loss or gradient is not finite
    is skipped: the optimiser does not step, so neither the weights, Adam's state nor the EMA
    change, and `global_step` (which counts optimiser steps) does not advance; the learning-rate
    warm-up steps once per batch, skipped or not.
    Skips are counted (`nonfinite_steps`, logged as ``train/skipped_nonfinite``); after
    `max_nonfinite_in_a_row` consecutive ones training saves ``nonfinite.ckpt`` (in the checkpoint
    folder) and stops with a `UQDMError`.
    """

    def __init__(
        self,
        lr: float = 2e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup: int = 1000,
        gradient_clip_val: float | None = 1.0,
        gradient_clip_algorithm: str = "norm",
        max_nonfinite_in_a_row: int = 10,
        estimator: str = "chain",
        init_from: str | None = None,
        **model,
    ):
        super().__init__()
        if max_nonfinite_in_a_row < 1:
            raise ValueError("max_nonfinite_in_a_row must be at least 1")
        if gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(f"unknown gradient_clip_algorithm {gradient_clip_algorithm!r}; "
                             f"choose one of {CLIP_ALGORITHMS}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        self.automatic_optimization = False  # `training_step` steps the optimiser, or skips the step
        self.nonfinite_steps = 0  # skipped training steps in the whole run (kept in checkpoints)
        self.nonfinite_in_a_row = 0
        self.save_hyperparameters()  # flat: the arguments above and those in `model`
        self.model = build_model(**model)
        if self.rate_is_theoretical:
            rank_zero_warn(
                "Gaussian diffusion: its bpd is the theoretical KL rate; no practical coder reaches it."
            )

    @property
    def rate_is_theoretical(self) -> bool:
        """True for the Gaussian model, whose rate no real bitstream achieves."""
        return isinstance(self.model, GaussianDiffusion)

    def setup(self, stage: str) -> None:
        """A new fit with `init_from` starts from that checkpoint's weights (EMA's copy follows at
        its first update, which copies the model)."""
        if stage == "fit" and self.hparams.init_from and self.trainer.ckpt_path is None:
            step = self.load_weights(self.hparams.init_from)
            if self.trainer.is_global_zero:
                print(f"initialised from {self.hparams.init_from} (its step {step}); optimiser and step count fresh")

    def load_weights(self, path: str):
        """Load the network's and schedule's weights of the checkpoint at `path`, read weights-only;
        returns the checkpoint's `global_step` (None if it has none)."""
        checkpoint = safe_load(path, map_location=self.device)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise UQDMError(f"{path} is not a uqdm checkpoint (no state_dict)")
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            reason = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise UQDMError(f"{path} does not fit this model (check the network options): {reason}") from None
        return checkpoint.get("global_step")

    def bits_per_dim(self, x_raw: torch.Tensor, estimator: str | None = None) -> dict[str, torch.Tensor]:
        """The NELBO and its terms in bits per dimension, averaged over the batch, by `estimator`
        (see `uqdm.estimators`); by default the training estimator in training mode, else (validation,
        test, the step-0 figure) the full chain."""
        estimator = estimator or (self.hparams.estimator if self.training else "chain")
        terms = nelbo(self.model, x_raw, estimator)
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

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """One optimiser step, taken by hand: the loss, its backward pass and, only if both are
        finite (the loss on every rank), Adam's step (clipping first, `on_before_optimizer_step`); then the warm-up's step.
        `global_step` counts `optimizer.step()` calls, so a skipped step leaves it still."""
        optimizer = self.optimizers()
        terms = self.bits_per_dim(batch)
        # Under DDP every rank must take the same branch (a rank that skipped its backward pass would
        # leave the others waiting in the gradients' all-reduce): the step goes on only if every
        # rank's loss is finite. The gradients, all-reduced, are then alike on every rank.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(terms["bpd"])), all=True)
        if not finite:
            self._skip_nonfinite("loss", float(terms["bpd"].detach()))
        else:
            self._log_terms("train", terms, batch.shape[0])
            self.log("gamma_min", self.model.schedule.gamma_min.detach(), on_step=True)
            self.manual_backward(terms["bpd"])  # scaled by a float16 grad scaler, if any
            if self._gradients_finite():
                optimizer.step()
                self.nonfinite_in_a_row = 0
            else:
                self._skip_nonfinite("gradient")
            optimizer.zero_grad()
        self.lr_schedulers().step()
        self.log("train/skipped_nonfinite", float(self.nonfinite_steps), on_step=True, batch_size=batch.shape[0])
        return terms["bpd"] if finite else None

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradients inside `optimizer.step()`, where a float16 grad scaler has already
        unscaled them (clipping before the step would clip scaled gradients)."""
        hp = self.hparams
        self.clip_gradients(optimizer, gradient_clip_val=hp.gradient_clip_val or 0.0,
                            gradient_clip_algorithm=hp.gradient_clip_algorithm)

    @staticmethod
    def check_trainer(trainer: L.Trainer) -> None:
        """Refuse, in one line, the Trainer's optimisation options that manual optimisation
        cannot honour (Lightning would refuse them too, with advice that does not apply here)."""
        for option in ("gradient_clip_val", "gradient_clip_algorithm"):
            value = getattr(trainer, option)
            if value is not None:
                value = getattr(value, "value", value)  # the algorithm is an enum
                raise UQDMError(f"trainer.{option} is a model option now: use --model.{option}={value} "
                                "(uqdm steps the optimiser itself, to skip non-finite steps)")
        if trainer.accumulate_grad_batches != 1:
            raise UQDMError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported "
                            "(uqdm steps the optimiser itself, to skip non-finite steps); raise the batch size instead")

    # ---- non-finite steps ------------------------------------------------------------------------

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (possible with a finite loss). With a float16 grad
        scaler, overflowing gradients are the scaler's to handle (it skips the step and lowers its
        scale), so they count as finite here."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _skip_nonfinite(self, what: str, value: float | None = None) -> None:
        """Count a skipped step; after `max_nonfinite_in_a_row` in a row, save a checkpoint and stop."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_in_a_row:
            path = self._nonfinite_checkpoint_path()
            self.trainer.save_checkpoint(path)
            last = f"{what} {value}" if value is not None else f"non-finite {what}"
            raise UQDMError(
                f"stopped training: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                f"gradient (last: {last}; {self.nonfinite_steps} skipped in all); the weights before them "
                f"(step {self.trainer.global_step}) are in {path}; check the data, the learning rate and "
                f"gradient clipping (limit: model.max_nonfinite_in_a_row)"
            )

    def _nonfinite_checkpoint_path(self) -> str:
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or self.trainer.default_root_dir
        return os.path.join(folder, "nonfinite.ckpt")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps"] = {"total": self.nonfinite_steps, "in_a_row": self.nonfinite_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counts = checkpoint.get("nonfinite_steps") or {}
        self.nonfinite_steps = int(counts.get("total", 0))
        self.nonfinite_in_a_row = int(counts.get("in_a_row", 0))
        steps = carry_automatic_step_count(checkpoint)
        if steps:
            rank_zero_info(f"checkpoint from before uqdm stepped the optimiser itself: its step count "
                           f"({steps}) carried over to manual optimisation's")

    # ----------------------------------------------------------------------------------------------

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
