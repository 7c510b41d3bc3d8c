"""Benchmark 2: images per second of `uqdm fit` on the default config against a plain PyTorch loop
doing the same work (forward, backward, clipping, Adam, EMA) on the same module, data and batch."""

import copy
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from uqdm.module import UQDMModule

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


class StepTimer(L.Callback):
    """Wall time of the training steps after the first `skip` (which include start-up)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.images = skip, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()
        if batch_idx >= self.skip:
            self.images += batch.shape[0]

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_images_per_second(steps: int, skip: int, workdir: Path) -> tuple[float, UQDMModule, L.LightningDataModule]:
    cli = LightningCLI(
        UQDMModule, L.LightningDataModule, subclass_mode_data=True, run=False,
        parser_kwargs={"parser_mode": "omegaconf+"}, save_config_kwargs={"overwrite": True},
        args=["--config", str(CONFIG), "--trainer.enable_progress_bar=false", f"--trainer.max_steps={steps + skip}", f"--trainer.val_check_interval={steps + skip}",
              f"--trainer.default_root_dir={workdir}", "--trainer.logger.init_args.save_dir=" + str(workdir)],
    )
    initial = copy.deepcopy(cli.model)
    timer = StepTimer(skip)
    cli.trainer.callbacks.append(timer)
    cli.trainer.limit_val_batches = 0
    cli.trainer.fit(cli.model, cli.datamodule)
    # the timer's window ends at on_train_end, after the last step (and the checkpoint it saves)
    return timer.images / timer.seconds, initial, cli.datamodule


def plain_images_per_second(module: UQDMModule, datamodule, steps: int, skip: int) -> float:
    module.train()
    clip = module.hparams.gradient_clip_val
    optimizer = module.configure_optimizers()["optimizer"]
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    loader = iter(datamodule.train_dataloader())
    images, start = 0, None
    for step in range(steps + skip):
        if step == skip:
            start = time.perf_counter()
        batch = next(loader)
        loss = module.bits_per_dim(batch)["bpd"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        ema.update_parameters(module)
        images += batch.shape[0] if step >= skip else 0
    return images / (time.perf_counter() - start)


def run(steps: int = 20, skip: int = 5, workdir: Path = Path("bench/.train")) -> dict:
    torch.manual_seed(0)
    lightning_ips, module, datamodule = lightning_images_per_second(steps, skip, workdir)
    plain_ips = plain_images_per_second(module, datamodule, steps, skip)
    return {
        "steps_timed": steps,
        "batch": datamodule.hparams.batch_size,
        "lightning_images_per_s": lightning_ips,
        "plain_images_per_s": plain_ips,
        "lightning_over_plain": lightning_ips / plain_ips,
    }
