"""Multi-process training on the CPU: Lightning's DDP strategy with the gloo backend, launched by
`python -m uqdm fit ... --trainer.devices=2 --trainer.strategy=ddp` (Lightning re-runs the command
once per extra rank). The code paths are the ones multi-GPU and multi-node runs take."""

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from uqdm.data import SampleImages

REPO = Path(__file__).resolve().parents[1]
PROGRESSIVE = "uqdm.evaluation.callback.ProgressiveMetrics"
VAL_SAMPLES = 8  # divisible by 2 ranks × batch 2: DistributedSampler pads nothing
SMALL = [
    f"--config={REPO / 'experiments' / 'default.yaml'}",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=cpu",
    "--data.init_args.batch_size=2",
    "--data.init_args.crop_size=16",
    "--data.init_args.train_samples=16",
    f"--data.init_args.val_samples={VAL_SAMPLES}",
    "--model.embedding_dim=8",
    "--model.norm_groups=4",
]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together while choosing, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def uqdm(args: list[str], cwd: Path, wandb_mode: str = "disabled", port: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": wandb_mode, "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free one, unless given (runs side by side)
    if port is not None:
        env["MASTER_PORT"] = str(port)
    log = tempfile.TemporaryFile()  # not a pipe: runs side by side must not block on a full one
    proc = subprocess.Popen([sys.executable, "-m", "uqdm", *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=300)
    proc.log.seek(0)
    output = proc.log.read().decode(errors="replace")
    proc.log.close()
    assert proc.returncode == 0, output[-4000:]
    return output


def metrics_args(path: Path) -> list[str]:
    return ["--trainer.callbacks+=uqdm.sweeps.FinalMetrics", f"--trainer.callbacks.init_args.path={path}"]


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> dict:
    """A 2-process fit of 4 steps, W&B offline, in a fresh folder."""
    cwd = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    output = finish(uqdm(["fit", *SMALL, "--trainer.devices=2", "--trainer.strategy=ddp",
                          *metrics_args(cwd / "fit.json")],
                         cwd, wandb_mode="offline"))
    wall = time.perf_counter() - start
    print(f"\n2-process CPU DDP fit of 4 steps: {wall:.1f} s wall")
    return {"cwd": cwd, "output": output, "wall": wall}


def test_ddp_fit_logs_once_and_saves_one_checkpoint(ddp_fit):
    cwd, output = ddp_fit["cwd"], ddp_fit["output"]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    record = read_metrics(cwd / "fit.json")
    assert record["world_size"] == 2 and record["global_step"] == 4
    assert math.isfinite(record["metrics"]["val/bpd"]) and "val/psnr/denoise/step_1" in record["metrics"]

    # One W&B run (rank 0's) holding the logged metrics, one run folder of checkpoints.
    wandb_runs = list((cwd / "runs" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    assert b"val/bpd" in next(wandb_runs[0].glob("run-*.wandb")).read_bytes()
    checkpoints = sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*.ckpt"))
    run_id = wandb_runs[0].name.rsplit("-", 1)[1]
    # one set from rank 0 only: the best by val/bpd, the latest, and last.ckpt
    assert len(checkpoints) == 3, checkpoints
    assert all(c.startswith(f"runs/uqdm/{run_id}/checkpoints/") for c in checkpoints)
    assert f"runs/uqdm/{run_id}/checkpoints/last.ckpt" in checkpoints
    assert sum("/best-" in c for c in checkpoints) == 1
    assert output.count("validation bpd: ") == 1  # TrainingSummary prints on rank 0 only


def test_ddp_validation_metrics_are_synchronised(ddp_fit, tmp_path):
    """Validate the DDP run's checkpoint with 2 processes and compare every logged val metric (the
    bpd terms and ProgressiveMetrics' bpp and PSNR per point) with 1-process runs on the same images.

    DistributedSampler without shuffling gives rank r the images r, r+2, ... So with the folder
    `all` = 8 images, rank r sees shard S_r (batches and batch indices as a 1-process run on S_r).
    The synchronised value is A = (L0(S0) + L1(S1))/2, where Lr(S) is the value rank r computes
    alone. A 1-process run gives L0(S). Rank 1's own value L1(S1) can differ from L0(S1), because
    ProgressiveMetrics seeds its noise by rank too; a 2-process run on `twice1` (S1 on both ranks)
    gives X = (L0(S1) + L1(S1))/2, so A must equal (L0(S0) + 2X - L0(S1))/2. An unsynchronised
    metric (rank 0's own value) would make that L0(S0) = (L0(S0) + L0(S1))/2, which fails since
    the shards differ. val/bpd is seeded by batch index only, so there A = (L0(S0) + L0(S1))/2.
    """
    val = SampleImages(crop_size=16, val_samples=VAL_SAMPLES)
    val.setup()
    folders = {"all": [], "shard0": [], "shard1": [], "twice1": []}
    for i in range(len(val.val_set)):
        folders["all"].append(i)
        folders[f"shard{i % 2}"].append(i)
        if i % 2:
            folders["twice1"] += [i, i]
    for folder, images in folders.items():
        (tmp_path / folder).mkdir()
        for k, i in enumerate(images):
            Image.fromarray(val.val_set[i].permute(1, 2, 0).numpy()).save(tmp_path / folder / f"{k:02d}.png")

    checkpoint = next(ddp_fit["cwd"].rglob("last.ckpt"))
    common = ["validate", f"--ckpt_path={checkpoint}", "--data=uqdm.data.ImageFolder",
              f"--data.train_dir={tmp_path / 'all'}", "--data.crop_size=16", "--data.batch_size=2",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
              f"--trainer.callbacks+={PROGRESSIVE}"]
    ports = free_ports(4)
    runs = {
        folder: uqdm([*common, f"--data.val_dir={tmp_path / folder}", *metrics_args(tmp_path / f"{folder}.json"),
                      *(["--trainer.devices=2", "--trainer.strategy=ddp"] if devices == 2 else ["--trainer.devices=1"])],
                     tmp_path, port=port)
        for (folder, devices), port in zip((("all", 2), ("twice1", 2), ("shard0", 1), ("shard1", 1)), ports)
    }
    for proc in runs.values():
        finish(proc)
    result = {folder: read_metrics(tmp_path / f"{folder}.json") for folder in runs}
    assert [result[f]["world_size"] for f in runs] == [2, 2, 1, 1]
    A, X, S0, S1 = (result[f]["metrics"] for f in runs)

    names = [name for name in A if name.startswith("val/")]
    assert "val/bpd" in names and "val/psnr/denoise/step_1" in names and "val/bpp/lossless" in names
    # The PSNR is a mean over the pictures that are not exact. At the last lossy point (step_T,
    # over 70 dB here) a picture can come out exact, and then the ranks' means have unequal weights
    # and the equal-weight identity below does not hold; at the earlier points none can be exact.
    last_lossy = f"step_{max(int(name.rsplit('_', 1)[1]) for name in names if '/step_' in name)}"
    names = [name for name in names if not (name.startswith("val/psnr/") and name.endswith(last_lossy))]
    for name in names:
        assert A[name] == pytest.approx((S0[name] + 2 * X[name] - S1[name]) / 2, rel=1e-5, abs=1e-5), name
    assert A["val/bpd"] == pytest.approx((S0["val/bpd"] + S1["val/bpd"]) / 2, rel=1e-6)
    # The shards differ, so rank 0's own values would have failed these comparisons.
    assert abs(S0["val/bpd"] - S1["val/bpd"]) > 1e-3
    assert abs(S0["val/psnr/denoise/step_1"] - S1["val/psnr/denoise/step_1"]) > 1e-3
