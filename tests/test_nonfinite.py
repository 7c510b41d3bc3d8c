"""A non-finite loss or gradient never reaches the weights, Adam's state or the EMA: the step is
skipped (and not counted as a step) and counted as skipped; after `max_nonfinite_in_a_row` in a row
training stops with a checkpoint."""

import lightning as L
import pytest
import torch

from uqdm.callbacks import EMA
from uqdm.data import SampleImages
from uqdm.errors import UQDMError
from uqdm.module import UQDMModule
from uqdm.weights import safe_load

OPTIMISATION = dict(lr=1e-3, warmup=0, gradient_clip_val=1.0)


class _NaNGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Faulty(UQDMModule):
    """Makes the loss (or only its gradient) non-finite on chosen training batches (0-based,
    counting every batch the Trainer feeds in)."""

    bad_batches, kind, batches_seen = frozenset(), "loss", 0  # set per instance: not hyperparameters

    def training_step(self, batch, batch_idx):
        self.injecting = self.batches_seen in self.bad_batches
        self.batches_seen += 1
        return super().training_step(batch, batch_idx)

    def bits_per_dim(self, x_raw):
        terms = super().bits_per_dim(x_raw)
        if self.training and getattr(self, "injecting", False):
            if self.kind == "loss":
                terms["bpd"] = terms["bpd"] * float("nan")
            else:
                terms["bpd"] = _NaNGradient.apply(terms["bpd"])
        return terms


def _faulty(tiny_hparams, bad_batches, kind="loss", **hparams):
    module = Faulty(**tiny_hparams, **OPTIMISATION, **hparams)
    module.bad_batches, module.kind = frozenset(bad_batches), kind
    return module


class Snapshots(L.Callback):
    """After every training batch: global step, weights, EMA state and Adam state (copies)."""

    def __init__(self, ema: EMA):
        self.ema, self.taken = ema, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()}
        adam = trainer.optimizers[0].state
        self.taken.append({
            "step": trainer.global_step,
            "weights": clone(pl_module.state_dict()),
            "ema": clone(self.ema._average_model.state_dict()),
            "adam": [clone(adam[p]) if p in adam else {} for p in pl_module.parameters()],
            "skipped": pl_module.nonfinite_steps,
            "in_a_row": pl_module.nonfinite_in_a_row,
        })


def _fit(module, tmp_path, max_steps, checkpoint_dir=None):
    L.seed_everything(0, verbose=False)
    ema = EMA(decay=0.9)
    snapshots = Snapshots(ema)
    callbacks = [ema, snapshots]
    if checkpoint_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
        enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    data = SampleImages(crop_size=8, batch_size=2, train_samples=16, val_samples=2)
    return trainer, snapshots, data


def _assert_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,estimator", [("loss", "chain"), ("gradient", "chain"), ("loss", "one_step"),
                                            ("gradient", "one_step")])
def test_nonfinite_step_is_skipped(tmp_path, kind, estimator, tiny_hparams):
    module = _faulty(tiny_hparams, {2}, kind, estimator=estimator)
    trainer, snapshots, data = _fit(module, tmp_path, max_steps=4)
    trainer.fit(module, datamodule=data)

    taken = snapshots.taken
    assert [s["step"] for s in taken] == [1, 2, 2, 3, 4]  # the bad batch is not a step
    before, skipped, after = taken[1], taken[2], taken[3]
    for what in ("weights", "ema", "adam"):  # untouched by the bad batch
        _assert_equal(skipped[what], before[what])
    assert not torch.equal(after["weights"]["model.network.conv_in.weight"],
                           before["weights"]["model.network.conv_in.weight"])  # training goes on
    assert all(torch.isfinite(v).all() for s in taken for v in (*s["weights"].values(), *s["ema"].values())
               if v.is_floating_point())
    assert int(skipped["ema"]["n_averaged"]) == int(before["ema"]["n_averaged"]) == 2
    assert [s["skipped"] for s in taken] == [0, 0, 1, 1, 1]
    assert [s["in_a_row"] for s in taken] == [0, 0, 1, 0, 0]
    assert all(int(state["step"]) == 4 for state in trainer.optimizers[0].state.values())
    assert module.nonfinite_steps == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0


class OtherRankNaN(UQDMModule):
    """Every loss here is finite, but on batch 2 another DDP rank's is not (the ranks' decision
    is simulated by the strategy's public `reduce_boolean_decision`)."""

    batches_seen = 0

    def training_step(self, batch, batch_idx):
        strategy, decide = self.trainer.strategy, type(self.trainer.strategy).reduce_boolean_decision
        bad = self.batches_seen == 2
        strategy.reduce_boolean_decision = lambda decision, all=True: decide(strategy, decision and not bad, all)
        self.batches_seen += 1
        return super().training_step(batch, batch_idx)


def test_a_nonfinite_loss_on_another_rank_skips_the_step_here(tmp_path, tiny_hparams):
    module = OtherRankNaN(**tiny_hparams, **OPTIMISATION)
    trainer, snapshots, data = _fit(module, tmp_path, max_steps=4)
    trainer.fit(module, datamodule=data)
    taken = snapshots.taken
    assert [s["step"] for s in taken] == [1, 2, 2, 3, 4]
    _assert_equal(taken[2]["weights"], taken[1]["weights"])
    assert module.nonfinite_steps == 1


def test_skip_count_is_kept_in_checkpoints(tmp_path, tiny_hparams):
    module = _faulty(tiny_hparams, {1})
    trainer, _, data = _fit(module, tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "skips.ckpt"
    trainer.save_checkpoint(path)
    assert safe_load(path)["nonfinite_steps"] == {"total": 1, "in_a_row": 0}
    fresh = UQDMModule(**tiny_hparams, **OPTIMISATION)
    fresh.on_load_checkpoint(safe_load(path))
    assert fresh.nonfinite_steps == 1


def test_too_many_in_a_row_stops_with_a_checkpoint(tmp_path, tiny_hparams):
    module = _faulty(tiny_hparams, range(2, 100), max_nonfinite_in_a_row=3)
    trainer, snapshots, data = _fit(module, tmp_path, max_steps=50, checkpoint_dir=tmp_path / "ckpts")
    with pytest.raises(UQDMError) as raised:
        trainer.fit(module, datamodule=data)

    path = tmp_path / "ckpts" / "nonfinite.ckpt"
    message = str(raised.value)
    assert "\n" not in message and "3 steps in a row" in message and str(path) in message
    assert [s["step"] for s in snapshots.taken] == [1, 2, 2, 2]  # the third bad batch raised
    saved = safe_load(path)
    assert saved["global_step"] == 2 and saved["nonfinite_steps"] == {"total": 3, "in_a_row": 3}
    # The checkpoint holds the last good weights (the EMA ones as `state_dict`, the current ones too).
    _assert_equal(saved["current_model_state"], snapshots.taken[1]["weights"])
    ema = {k[len("module."):]: v for k, v in snapshots.taken[1]["ema"].items() if k.startswith("module.")}
    _assert_equal(saved["state_dict"], ema)
    assert UQDMModule.load_from_checkpoint(path, weights_only=True).hparams.max_nonfinite_in_a_row == 3


def test_max_nonfinite_in_a_row_must_be_positive(tiny_hparams):
    with pytest.raises(ValueError):
        UQDMModule(max_nonfinite_in_a_row=0, **tiny_hparams, **OPTIMISATION)
