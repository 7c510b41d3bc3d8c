"""Benchmark 3: the training estimators (`uqdm.estimators`) on the default config.

- `step_cost`: time and memory of one training step (forward, backward, clipping, Adam) for
  T ∈ {1, 4, 16} and both estimators, the configurations measured in turn, repeat after repeat.
  Memory is the peak allocated on a GPU; on a CPU (no allocator statistics) it is the bytes autograd
  keeps for the backward pass (activations and the weights the backward reads), which is what
  grows with T.
- `equal_time`: the validation NELBO (full chain, EMA weights, fixed noise) after the same training
  time, `chain` against `one_step`, at T = 4 and T = 16. Each arm is a single-threaded process
  and trains for the same CPU time, so a shared machine's load hits them alike.
- `ema_share`: the EMA update's share of a training step, the fused update (`uqdm.callbacks.
  ema_update`, one `_foreach_lerp_`) against one update per tensor (the callback before).
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel

from uqdm.callbacks import ema_decay, ema_update
from uqdm.data import SampleImages
from uqdm.module import UQDMModule
from uqdm.rng import seeded

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


# `BENCH_SMALL=1`: the 16-channel network on 16×16 crops of sweeps/steps-cpu.yaml, for a loaded machine
SMALL = {"model": {"embedding_dim": 16}, "data": {"crop_size": 16}}


def default_config() -> tuple[dict, dict]:
    """The model options and the data options of experiments/default.yaml (made small by BENCH_SMALL=1)."""
    config = yaml.safe_load(CONFIG.read_text())
    small = os.environ.get("BENCH_SMALL") == "1"
    model, options = dict(config["model"]), dict(config["data"]["init_args"])
    return ({**model, **SMALL["model"]}, {**options, **SMALL["data"]}) if small else (model, options)


def build(n_timesteps: int, estimator: str, seed: int = 0) -> UQDMModule:
    model, _ = default_config()
    torch.manual_seed(seed)
    return UQDMModule(**{**model, "n_timesteps": n_timesteps, "estimator": estimator})


def data() -> SampleImages:
    _, options = default_config()
    datamodule = SampleImages(**options)
    datamodule.setup("fit")
    return datamodule


def batches(datamodule: SampleImages, seed: int = 0):
    torch.manual_seed(seed)
    while True:
        yield from datamodule.train_dataloader()


class Trainee:
    """A module with its optimiser, warm-up, EMA and data: `step()` is one training step."""

    def __init__(self, n_timesteps: int, estimator: str, datamodule: SampleImages):
        self.module = build(n_timesteps, estimator)
        self.module.train()
        config = self.module.configure_optimizers()
        self.optimizer, self.ramp = config["optimizer"], config["lr_scheduler"]["scheduler"]
        self.ema = AveragedModel(self.module, multi_avg_fn=ema_update(), use_buffers=True)
        self.batches, self.steps, self.seconds = batches(datamodule), 0, 0.0

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module.bits_per_dim(batch, self.module.hparams.estimator)["bpd"]

    def step(self, batch: torch.Tensor | None = None) -> None:
        batch = next(self.batches) if batch is None else batch
        self.optimizer.zero_grad()
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.module.hparams.gradient_clip_val)
        self.optimizer.step()
        self.ramp.step()
        self.ema.update_parameters(self.module)
        self.steps += 1


def backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of `fn()`."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def step_cost(steps=(1, 4, 16), repeats: int = 5) -> dict:
    """Median seconds and memory of one training step per T and estimator, and each estimator's
    T = max over T = min ratios."""
    datamodule = data()
    batch = next(batches(datamodule))
    arms = {(T, e): Trainee(T, e, datamodule) for T in steps for e in ("chain", "one_step")}
    times = {key: [] for key in arms}
    for arm in arms.values():
        arm.step(batch)  # warm-up
    for _ in range(repeats):
        for key, arm in arms.items():
            start = time.perf_counter()
            arm.step(batch)
            times[key].append(time.perf_counter() - start)
    cuda = torch.cuda.is_available()
    memory = {}
    for key, arm in arms.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            arm.step(batch)
            memory[key] = torch.cuda.max_memory_allocated()
        else:
            memory[key] = backward_bytes(lambda: arm.loss(batch))
    out = {"memory": "peak allocated (GPU)" if cuda else "bytes kept for backward (CPU)", "batch": batch.shape[0]}
    for (T, e) in arms:
        out[f"{e}_T{T}"] = {"step_s": statistics.median(times[(T, e)]), "memory_mb": memory[(T, e)] / 2**20}
    lo, hi = min(steps), max(steps)
    for e in ("chain", "one_step"):
        out[f"{e}_T{hi}_over_T{lo}"] = {
            "time": out[f"{e}_T{hi}"]["step_s"] / out[f"{e}_T{lo}"]["step_s"],
            "memory": out[f"{e}_T{hi}"]["memory_mb"] / out[f"{e}_T{lo}"]["memory_mb"],
        }
    return out


@torch.no_grad()
def validation_bpd(module: torch.nn.Module, datamodule: SampleImages) -> float:
    """The full-chain NELBO in bits per dimension on the validation set, noise seeded per batch."""
    module.eval()
    total, n = 0.0, 0
    for batch_idx, batch in enumerate(datamodule.val_dataloader()):
        with seeded(batch_idx):
            total += float(module.bits_per_dim(batch)["bpd"]) * batch.shape[0]
        n += batch.shape[0]
    return total / n


def train_for(n_timesteps: int, estimator: str, budget_s: float) -> dict:
    """Train one arm from the common start until this process has used `budget_s` CPU seconds
    (one thread); its validation bpd with EMA weights and its step count."""
    torch.set_num_threads(1)
    datamodule = data()
    arm = Trainee(n_timesteps, estimator, datamodule)
    start = time.process_time()
    while time.process_time() - start < budget_s:
        arm.step()
    return {"val_bpd": validation_bpd(arm.ema.module, datamodule), "steps": arm.steps}


def equal_time(budget_s: float = 90.0, steps=(4, 16)) -> dict:
    """Validation bpd (EMA weights) of `chain` and `one_step` after the same training time at each
    T. Each arm runs in its own single-threaded process, all at once, and trains for `budget_s`
    seconds of its CPU time, so a shared machine's load cannot favour one arm."""
    arms = [(T, e) for T in steps for e in ("chain", "one_step")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = {arm: subprocess.Popen([sys.executable, __file__, "arm", str(arm[0]), arm[1], str(budget_s)],
                                       stdout=subprocess.PIPE, text=True, env=env) for arm in arms}
    out = {"budget_cpu_s": budget_s, "small": os.environ.get("BENCH_SMALL") == "1",
           f"start_bpd_T{steps[0]}": validation_bpd(build(steps[0], "chain"), data())}
    for (T, e), process in processes.items():
        stdout, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"arm T={T} {e} failed with exit code {process.returncode}")
        out[f"{e}_T{T}"] = json.loads(stdout)
    for T in steps:
        out[f"one_step_minus_chain_T{T}"] = out[f"one_step_T{T}"]["val_bpd"] - out[f"chain_T{T}"]["val_bpd"]
    return out


def per_tensor_ema(decay: float = 0.9999):
    """The callback's EMA before: one `lerp` and one read of the update count per tensor."""

    def ema(averaged: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
        return torch.lerp(averaged, current, 1.0 - ema_decay(int(n_averaged) + 1, decay))

    return ema


def ema_share(n_timesteps: int = 4, estimator: str = "one_step", repeats: int = 20) -> dict:
    """Seconds of an EMA update, fused and per tensor, over the seconds of a training step."""
    datamodule = data()
    trainee = Trainee(n_timesteps, estimator, datamodule)
    batch = next(batches(datamodule))
    fused = AveragedModel(trainee.module, multi_avg_fn=ema_update(), use_buffers=True)
    per_tensor = AveragedModel(copy.deepcopy(trainee.module), avg_fn=per_tensor_ema(), use_buffers=True)
    times = {"step": [], "fused": [], "per_tensor": []}
    for i in range(repeats + 1):
        start = time.perf_counter()
        trainee.step(batch)
        step = time.perf_counter() - start
        for name, averaged in (("fused", fused), ("per_tensor", per_tensor)):
            start = time.perf_counter()
            averaged.update_parameters(trainee.module)
            if i:
                times[name].append(time.perf_counter() - start)
        if i:
            times["step"].append(step)
    step = statistics.median(times["step"])
    return {
        "tensors": sum(1 for _ in trainee.module.parameters()) + sum(1 for _ in trainee.module.buffers()),
        "step_s": step,
        "fused_share": statistics.median(times["fused"]) / step,
        "per_tensor_share": statistics.median(times["per_tensor"]) / step,
    }


def run(budget_s: float = 90.0) -> dict:
    return {"step_cost": step_cost(), "ema": ema_share(), "equal_time": equal_time(budget_s)}


if __name__ == "__main__":  # python bench/estimators.py [step_cost|ema|equal_time [BUDGET]|arm T ESTIMATOR BUDGET]
    part, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("all", [])
    if part == "arm":
        figures = train_for(int(args[0]), args[1], float(args[2]))
    else:
        figures = {"step_cost": step_cost, "ema": ema_share, "all": run,
                   "equal_time": lambda: equal_time(*map(float, args[:1]))}[part]()
    print(json.dumps(figures, indent=1))
