"""Training that dies: a short CPU run is SIGKILLed after its first checkpoint, resumed with
``--ckpt_path last``, and must end exactly where an uninterrupted run of the same length ends.

The checkpoints fall at epoch ends (2 batches an epoch, one every 2 steps): from there a resumed
run repeats the uninterrupted one bit for bit (`uqdm.resume.ResumeState` restores the
random generators; deterministic CPU kernels, one thread), and the W&B run continues. Resuming
mid-epoch, for every data module and with workers: `tests/test_resume_any_step.py`.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_states import assert_same
from short_fit import short_fit_config
from uqdm.weights import safe_load

STEPS, CHECKPOINT_EVERY = 6, 2

HELPERS = '''
import os, time
from lightning.pytorch import Callback

class ParkAfterCheckpoint(Callback):
    """With $PARK_MARKER set: in the step after global step `at`, between backward and the update,
    create that file and wait to be killed."""
    def __init__(self, at: int):
        self.at = at
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        marker = os.environ.get("PARK_MARKER")
        if marker and trainer.global_step == self.at:
            open(marker, "w").close()
            while True:
                time.sleep(0.5)

class StepLog(Callback):
    """Appends the global step at the start of every training batch to $STEP_LOG."""
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.environ["STEP_LOG"], "a") as f:
            f.write(f"{trainer.global_step}\\n")
'''

CONFIG = short_fit_config(
    STEPS,
    callbacks=[
        {"class_path": "uqdm.callbacks.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": CHECKPOINT_EVERY, "save_last": True, "save_top_k": -1}},
        {"class_path": "uqdm.callbacks.TrainingSummary"},
        {"class_path": "uqdm_test_helpers.ParkAfterCheckpoint", "init_args": {"at": CHECKPOINT_EVERY}},
        {"class_path": "uqdm_test_helpers.StepLog"},
    ],
    trainer={
        "log_every_n_steps": 1,
        "plugins": [{"class_path": "uqdm.resume.AtomicCheckpointIO"}],
        "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                   "init_args": {"project": "resume-test", "name": "resume", "save_dir": "runs"}},
    },
    model={"estimator": "one_step"},  # draws a step per image: its random generator must resume too
    data={"class_path": "uqdm.data.SampleImages",
          "init_args": {"crop_size": 8, "batch_size": 2, "train_samples": 4, "val_samples": 2}},
)


def _setup(folder: Path) -> dict:
    """A run folder with the config and helpers; the environment to run `uqdm fit` in it."""
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG)
    (folder / "uqdm_test_helpers.py").write_text(HELPERS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PARK_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", STEP_LOG=str(folder / "steps.txt"))
    return env


def _fit(folder: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "uqdm", "fit", "--config", "config.yaml", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _steps(folder: Path) -> list[int]:
    return [int(line) for line in (folder / "steps.txt").read_text().split()]


def _checkpoints(folder: Path) -> Path:
    (found,) = (folder / "runs" / "resume-test").glob("*/checkpoints")
    return found


@pytest.mark.timeout(600)
def test_killed_run_resumes_where_it_stopped(tmp_path):
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    reference_env, killed_env = _setup(reference), _setup(killed)
    marker = killed / "parked"
    # The two first runs in parallel, one thread each.
    uninterrupted = _fit(reference, reference_env)
    victim = _fit(killed, {**killed_env, "PARK_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert victim.poll() is None, f"the run ended before it was killed:\n{victim.communicate()[0][-4000:]}"
            assert time.monotonic() < deadline, "the run never reached its second checkpoint interval"
            time.sleep(0.2)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    folder = _checkpoints(killed)
    assert sorted(p.name for p in folder.iterdir()) == [f"epoch=0-step={CHECKPOINT_EVERY}.ckpt", "last.ckpt"]
    before = safe_load(folder / "last.ckpt")
    assert before["global_step"] == CHECKPOINT_EVERY
    assert _steps(killed) == [0, 1, 2]  # killed inside step 3, after its backward pass

    output = _finish(_fit(killed, killed_env, "--ckpt_path", "last"))
    reference_output = _finish(uninterrupted)
    assert "Restored all states from the checkpoint" in output

    # The step count continues: the resumed process trained steps 3..6 only.
    assert _steps(killed) == [0, 1, 2] + list(range(CHECKPOINT_EVERY, STEPS))
    assert _steps(reference) == list(range(STEPS))
    # The same checkpoint folder, W&B run id and offline run: the logger's run continues.
    assert _checkpoints(killed) == folder and not list(folder.glob(".*"))  # no temporary files left
    resumed, expected = safe_load(folder / "last.ckpt"), safe_load(_checkpoints(reference) / "last.ckpt")
    run_id = before["uqdm_resume"]["loggers"][0]["version"]
    assert resumed["uqdm_resume"]["loggers"][0]["version"] == run_id == folder.parent.name
    wandb_runs = sorted(p.name for p in (killed / "runs" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)

    assert resumed["global_step"] == expected["global_step"] == STEPS
    # Optimiser state continued (Adam's step counts all steps), as did the EMA's update count.
    adam = resumed["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == STEPS for s in adam.values())
    assert int(resumed["averaging_state"]["n_averaged"]) == STEPS
    schedule = [k for k in resumed["current_model_state"] if ".schedule." in k]
    assert schedule, "the learned noise schedule should be among the weights"
    # And everything ends bit for bit where the uninterrupted run ends: weights (the learned
    # schedule's too), EMA weights and state, Adam's moments, learning-rate schedule, generators.
    for key in ("current_model_state", "state_dict", "averaging_state", "optimizer_states", "lr_schedulers"):
        assert_same(resumed[key], expected[key], key)
    assert_same(resumed["uqdm_resume"]["rng"], expected["uqdm_resume"]["rng"], "rng")
    assert "validation bpd" in output and "validation bpd" in reference_output
