"""A run SIGKILLed in the middle of an epoch, resumed with ``uqdm fit --ckpt_path last``, ends bit
for bit where the uninterrupted run ends, for SampleImages, ImageFolder and (shuffled) ImageNet64,
with the data read in the main process and in 2 workers.

Each run: 3 batches an epoch, a checkpoint every 2 steps, 8 steps. The killed run dies in the
optimiser step of its 6th batch (global step 5), a step after the checkpoint of step 4, which was
taken after the first batch of epoch 1. The resumed run must draw the very batches the
uninterrupted one drew at steps 4 … 7 (logged with a hash of each batch), into epoch 2, and end
with the same weights, EMA, Adam state and generators.

One driver process imports everything once and forks a child per run (a fresh process as far as
training is concerned: nothing has run in the parent), two at a time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoint_states import assert_same
from short_fit import short_fit_config
from uqdm.weights import safe_load

STEPS, CHECKPOINT_EVERY, KILL_AT = 8, 2, 5
CASES = [(data, workers) for data in ("SampleImages", "ImageFolder", "ImageNet64") for workers in (0, 2)]

DRIVER = r'''
import json, os, signal, sys, hashlib
import multiprocessing as mp
import torch
from lightning.pytorch import Callback
from uqdm.cli import main

class KillAt(Callback):
    """SIGKILLs its own process in the optimiser step of global step `at` (after backward)."""
    def __init__(self, at: int):
        self.at = at
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if os.environ.get("KILL") and trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

class BatchLog(Callback):
    """Appends `global step, SHA-256 of the batch` to $BATCH_LOG at the start of every batch."""
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.environ["BATCH_LOG"], "a") as f:
            f.write(f"{trainer.global_step} {hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]}\n")

def fit(folder, run, *args):
    sys.argv = sys.argv[:1]
    os.chdir(folder)
    os.environ["BATCH_LOG"] = f"{folder}/{run}.log"
    if run == "killed":
        os.environ["KILL"] = "1"
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", "config.yaml", "--trainer.default_root_dir", run,
              f"--trainer.callbacks.init_args.dirpath={folder}/{run}", *args])
    except SystemExit as e:
        os._exit(e.code or 0)
    os._exit(0)

def run_all(pairs):
    """Run (folder, run, args) children two at a time; return their exit codes."""
    ctx, codes = mp.get_context("fork"), []
    for i in range(0, len(pairs), 2):
        children = [ctx.Process(target=fit, args=(f, r, *a)) for f, r, a in pairs[i : i + 2]]
        for c in children:
            c.start()
        for c in children:
            c.join(600)
            codes.append(c.exitcode)
    return codes

if __name__ == "__main__":
    sys.modules["uqdm_resume_driver"] = sys.modules["__main__"]
    folders = sys.argv[1:]
    first = run_all([(f, r, ()) for f in folders for r in ("uninterrupted", "killed")])
    # the resumed run continues in the killed run's folder
    resumed = run_all([(f, "resumed", ("--ckpt_path", "last", f"--trainer.callbacks.init_args.dirpath={f}/killed"))
                       for f in folders])
    print(json.dumps({"first": first, "resumed": resumed}))
'''

CONFIG = short_fit_config(
    STEPS,
    callbacks=[
        {"class_path": "uqdm.callbacks.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "uqdm_resume_driver.KillAt", "init_args": {"at": KILL_AT}},
        {"class_path": "uqdm_resume_driver.BatchLog"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": CHECKPOINT_EVERY, "save_last": True, "save_top_k": -1}},
    ],
    trainer={"logger": False},
)


def _data_config(kind: str, folder: Path, workers: int) -> str:
    """The `data:` section, and the files it reads: 6 training images (3 batches of 2), 2 for validation."""
    rng = np.random.default_rng(0)
    common = f"batch_size: 2, num_workers: {workers}"
    if kind == "SampleImages":
        return f"{{crop_size: 8, train_samples: 6, val_samples: 2, {common}}}"
    if kind == "ImageFolder":
        for split, n in (("train", 6), ("val", 2)):
            (folder / split).mkdir()
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)).save(folder / split / f"{i}.png")
        return f"{{train_dir: {folder / 'train'}, val_dir: {folder / 'val'}, crop_size: 8, {common}}}"
    np.savez(folder / "train_data.npz", data=rng.integers(0, 256, (6, 12288), dtype=np.uint8))
    np.savez(folder / "val_data.npz", data=rng.integers(0, 256, (2, 12288), dtype=np.uint8))
    return f"{{data_dir: {folder}, {common}}}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every case's three runs: uninterrupted, killed at step 5, resumed."""
    root = tmp_path_factory.mktemp("resume-any-step")
    folders = {}
    for kind, workers in CASES:
        folder = root / f"{kind}-{workers}"
        folder.mkdir()
        data = _data_config(kind, folder, workers)
        (folder / "config.yaml").write_text(CONFIG + f"data:\n  class_path: uqdm.data.{kind}\n  init_args: {data}\n")
        folders[(kind, workers)] = folder
    driver = root / "uqdm_resume_driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, str(driver), *map(str, folders.values())], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    codes = json.loads(run.stdout.strip().splitlines()[-1])
    return {"folders": folders, "codes": codes, "output": run.stderr}


def _log(path: Path) -> list[tuple[int, str]]:
    return [(int(step), digest) for step, digest in (line.split() for line in path.read_text().splitlines())]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind, workers", CASES)
def test_killed_mid_epoch_resumes_bit_for_bit(runs, kind, workers):
    index = CASES.index((kind, workers))
    folder = runs["folders"][(kind, workers)]
    uninterrupted_code, killed_code = runs["codes"]["first"][2 * index : 2 * index + 2]
    assert uninterrupted_code == 0 and runs["codes"]["resumed"][index] == 0, runs["output"][-4000:]
    assert killed_code == -9  # SIGKILL

    # The checkpoint it resumed from was taken in the middle of epoch 1, after its first batch.
    killed_at = safe_load(folder / "killed" / f"epoch=1-step={KILL_AT - 1}.ckpt")
    assert killed_at["global_step"] == KILL_AT - 1 and killed_at["epoch"] == 1
    loader_state = killed_at["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"seed": 0, "epoch": 1, "batches": 1}]

    # The same batches at every step: the resumed run redraws the batch of the lost step 5.
    expected = _log(folder / "uninterrupted.log")
    assert [step for step, _ in expected] == list(range(STEPS))
    assert len({digest for _, digest in expected}) == STEPS  # distinct batches: the log tells them apart
    assert _log(folder / "killed.log") == expected[: KILL_AT + 1]
    assert _log(folder / "resumed.log") == expected[KILL_AT - 1 :]

    # And the same final state, bit for bit.
    resumed, reference = safe_load(folder / "killed" / "last.ckpt"), safe_load(folder / "uninterrupted" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == STEPS
    for key in ("current_model_state", "state_dict", "averaging_state", "optimizer_states", "lr_schedulers"):
        assert_same(resumed[key], reference[key], key)
    assert_same(resumed["uqdm_resume"]["rng"], reference["uqdm_resume"]["rng"], "rng")
    assert not list((folder / "killed").glob(".*"))  # no temporary left by the kill
