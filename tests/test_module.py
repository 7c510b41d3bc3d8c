"""The LightningModule and the EMA: optimisation, warm-up, averaged weights in checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from uqdm.callbacks import EMA
from uqdm.errors import UQDMError
from uqdm.module import UQDMModule
from uqdm.rng import seeded
from uqdm.weights import load_model


def images(n=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, 2, 2, generator=g).repeat_interleave(size // 2, 2).repeat_interleave(size // 2, 3)
    return (smooth * 255).to(torch.uint8)


def test_bpd_terms_add_up_and_gamma_min_is_logged_value(tiny_hparams):
    module = UQDMModule(**tiny_hparams)
    terms = module.bits_per_dim(images())
    assert set(terms) == {"bpd", "bpd_latent", "bpd_diff", "bpd_recon"}
    assert torch.allclose(terms["bpd"], terms["bpd_latent"] + terms["bpd_diff"] + terms["bpd_recon"])
    assert float(module.model.schedule.gamma_min.detach()) == pytest.approx(-12.3, abs=1e-5)


@pytest.mark.parametrize("estimator", ["chain", "one_step"])
def test_a_few_training_steps_lower_the_loss(tiny_hparams, estimator):
    torch.manual_seed(0)
    module = UQDMModule(**{**tiny_hparams, "n_timesteps": 4}, lr=1e-2, warmup=0, estimator=estimator)
    batch = images()
    optimizer = module.configure_optimizers()["optimizer"]
    with seeded(0):
        before = float(module.bits_per_dim(batch, "chain")["bpd"])
    for _ in range(50):
        loss = module.bits_per_dim(batch)["bpd"]  # the training estimator in training mode
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with seeded(0):
        after = float(module.bits_per_dim(batch, "chain")["bpd"])
    assert after < 0.93 * before  # noisy single-sample NELBO; deterministic under the seed


def test_learning_rate_ramps_linearly_over_warmup(tiny_hparams):
    module = UQDMModule(**tiny_hparams, lr=1e-3, warmup=4)
    config = module.configure_optimizers()
    optimizer, ramp = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        ramp.step()
    assert rates == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_gaussian_variant_is_labelled_theoretical(tiny_hparams):
    with pytest.warns(UserWarning, match="theoretical"):
        module = UQDMModule(**tiny_hparams, diffusion="gaussian")
    assert module.rate_is_theoretical and module.model.prior_type == "normal"
    assert not UQDMModule(**tiny_hparams).rate_is_theoretical
    with pytest.raises(ValueError):
        UQDMModule(**tiny_hparams, diffusion="poisson")


def test_ema_follows_the_paper_warmup_and_checkpoints_hold_the_average(tmp_path, tiny_hparams):
    torch.manual_seed(0)
    module = UQDMModule(**tiny_hparams, lr=1e-2, warmup=0)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    ema = EMA(decay=0.9999)
    trainer = L.Trainer(max_steps=3, callbacks=[Record(), ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(images(6), batch_size=2))
    # Lightning copies the first weights, then avg ← avg + (1 − d_n)(w − avg) with d_n = (1 + n)/(10 + n)
    key = "model.schedule.w"
    expected = seen[0][key]
    for n, weights in enumerate(seen[1:], start=2):
        decay = min(0.9999, (1 + n) / (10 + n))
        expected = expected + (1 - decay) * (weights[key] - expected)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = {f"model.{name}": value for name, value in load_model(ckpt).state_dict().items()}
    assert torch.allclose(loaded[key], expected)
    assert not torch.allclose(loaded[key], seen[-1][key])
    assert not torch.equal(loaded[key], start[key])


def test_training_estimator_in_training_mode_and_the_chain_otherwise(monkeypatch, tiny_hparams):
    module = UQDMModule(**tiny_hparams, estimator="one_step")
    used = []
    monkeypatch.setattr("uqdm.module.nelbo", lambda model, x, estimator: used.append(estimator) or model.nelbo(x))
    module.train()
    module.bits_per_dim(images(2))
    module.eval()
    module.bits_per_dim(images(2))
    assert used == ["one_step", "chain"]
    with pytest.raises(ValueError, match="one_step"):
        UQDMModule(**tiny_hparams, estimator="two_step")


def test_init_from_starts_a_fit_from_a_checkpoints_weights_with_a_fresh_optimiser(tmp_path, capsys, tiny_hparams):
    source = UQDMModule(**tiny_hparams)
    with torch.no_grad():
        source.model.schedule.w.fill_(11.0)
        source.model.network.conv_in.weight.mul_(3.0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(source, DataLoader(images(2), batch_size=2))
    trainer.save_checkpoint(tmp_path / "source.ckpt")
    saved = source.state_dict()

    class Start(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}

    start = Start()
    module = UQDMModule(**tiny_hparams, init_from=str(tmp_path / "source.ckpt"))
    trainer = L.Trainer(max_steps=2, callbacks=[start], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(images(4), batch_size=2))
    assert all(torch.equal(start.weights[k], saved[k]) for k in saved)
    assert trainer.global_step == 2 and all(int(s["step"]) == 2 for s in trainer.optimizers[0].state.values())
    assert "initialised from" in capsys.readouterr().out

    wrong = UQDMModule(**{**tiny_hparams, "embedding_dim": 16}, init_from=str(tmp_path / "source.ckpt"))
    with pytest.raises(UQDMError, match="does not fit this model"):
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(wrong, DataLoader(images(2), batch_size=2))


@pytest.mark.parametrize("algorithm,clip", [("norm", 1e-3), ("value", 1e-4), ("norm", None)])
def test_the_module_clips_the_gradients_it_steps_with(tmp_path, tiny_hparams, algorithm, clip):
    seen = {}

    class Recorded(UQDMModule):  # the gradients as Adam receives them: after the module's hook
        def on_before_optimizer_step(self, optimizer):
            seen["raw"] = torch.cat([p.grad.flatten() for p in self.parameters() if p.grad is not None])
            super().on_before_optimizer_step(optimizer)
            seen["stepped"] = torch.cat([p.grad.flatten() for p in self.parameters() if p.grad is not None])

    torch.manual_seed(0)
    module = Recorded(**tiny_hparams, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(images(2), batch_size=2))
    raw, stepped = seen["raw"], seen["stepped"]
    assert trainer.global_step == 1 and raw.norm() > 1e-2 and raw.abs().max() > 1e-3
    if clip is None:
        assert torch.equal(stepped, raw)
    elif algorithm == "norm":
        assert float(stepped.norm()) == pytest.approx(clip, rel=1e-4)
        assert torch.allclose(stepped, raw * (clip / raw.norm()), rtol=1e-4, atol=0)
    else:
        assert torch.equal(stepped, raw.clamp(-clip, clip))
    with pytest.raises(ValueError, match="norm"):
        UQDMModule(**tiny_hparams, gradient_clip_algorithm="max")


def test_a_checkpoint_from_automatic_optimisation_resumes_its_step_count(tmp_path, tiny_hparams, caplog):
    """Checkpoints written before the module stepped the optimiser itself count their steps under
    Lightning's automatic optimisation; resuming one continues its `global_step`."""
    fit = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path)
    trainer = L.Trainer(max_steps=2, **fit)
    trainer.fit(UQDMModule(**tiny_hparams), DataLoader(images(8), batch_size=2))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    loop = checkpoint["loops"]["fit_loop"]
    steps = loop["epoch_loop.manual_optimization.optim_step_progress"]
    assert steps["total"]["completed"] == 2
    loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = steps  # as written then
    loop["epoch_loop.manual_optimization.optim_step_progress"] = {
        part: {"ready": 0, "completed": 0} for part in ("total", "current")}
    torch.save(checkpoint, tmp_path / "old.ckpt")

    trainer = L.Trainer(max_steps=3, **fit)
    with caplog.at_level("INFO"):
        trainer.fit(UQDMModule(**tiny_hparams), DataLoader(images(8), batch_size=2), ckpt_path=tmp_path / "old.ckpt",
                    weights_only=True)
    assert trainer.global_step == 3 and all(int(s["step"]) == 3 for s in trainer.optimizers[0].state.values())
    assert "its step count (2) carried over" in caplog.text
