"""The LightningModule and the EMA: optimisation, warm-up, averaged weights in checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from uqdm.callbacks import EMA
from uqdm.checkpoints import load_module
from uqdm.module import UQDMModule
from uqdm.rng import seeded

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


def test_a_few_training_steps_lower_the_loss(tiny_hparams):
    torch.manual_seed(0)
    module = UQDMModule(**{**tiny_hparams, "n_timesteps": 4}, lr=1e-2, warmup=0)
    batch = images()
    optimizer = module.configure_optimizers()["optimizer"]
    with seeded(0):
        before = float(module.bits_per_dim(batch)["bpd"])
    for _ in range(50):
        loss = module.bits_per_dim(batch)["bpd"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with seeded(0):
        after = float(module.bits_per_dim(batch)["bpd"])
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
    loaded = load_module(ckpt)
    assert torch.allclose(loaded.state_dict()[key], expected)
    assert not torch.allclose(loaded.state_dict()[key], seen[-1][key])
    assert not torch.equal(loaded.state_dict()[key], start[key])
