"""Nothing lost without being told: `uqdm compress` / `decompress` of many files go on past a bad
one; a full disk (a tmpfs the test mounts in its own mount namespace where it can, and a writer
made to fail everywhere) leaves the earlier file intact and no temporary, in one line and exit 2,
for .uqdm files, PNGs and training checkpoints; running out of memory is one line that suggests a
smaller --batch-tiles; two processes writing the same output leave one complete file; memory stays
flat over many files.

The GPU out-of-memory case runs here as torch's `OutOfMemoryError` raised by the network (no GPU
in CI); the CPU case is a real failed allocation under an address-space cap.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import uqdm.codec.codec
from full_disk import fill_atomic_writes
from uqdm.codec.fuzz import memory_cap, one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
TILE = 4
SLOW = 120  # seconds a command may take here (run_cli's watchdog)


def _rgb(path: Path, seed: int, h: int = 6, w: int = 5) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _compress(ckpt, *args):
    return run_cli(["compress", "--ckpt", str(ckpt), *map(str, args), "--tile", str(TILE)], time_limit=SLOW)


def _decompress(ckpt, *args):
    return run_cli(["decompress", "--ckpt", str(ckpt), *map(str, args)], time_limit=SLOW)


def _reports_one_failure(run, name: str, total: int, verb: str) -> bool:
    """Exit 2; stderr: one error line naming `name`, then the summary."""
    errors = [line for line in run.stderr if line.startswith("uqdm: error: ")]
    return (run.error is None and run.code == 2 and len(errors) == 2 and name in errors[0]
            and errors[1] == f"uqdm: error: 1 of {total} inputs failed; {total - 1} {verb}")


# --- batch jobs -------------------------------------------------------------------------------
def test_compress_and_decompress_go_on_past_a_bad_file(ckpt, tmp_path):
    images = [_rgb(tmp_path / f"{name}.png", i) for i, name in enumerate("acd")]
    bad = tmp_path / "b.png"
    bad.write_bytes(b"garbage, second of four")
    run = _compress(ckpt, images[0], bad, *images[1:], "--out-dir", tmp_path / "c")
    assert _reports_one_failure(run, "b.png", 4, "compressed"), run.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.uqdm", "c.uqdm", "d.uqdm"]

    garbage = tmp_path / "c" / "x.uqdm"
    garbage.write_bytes(b"garbage")
    files = [tmp_path / "c" / "a.uqdm", garbage, tmp_path / "c" / "c.uqdm", tmp_path / "c" / "d.uqdm"]
    run = _decompress(ckpt, *files, "--out-dir", tmp_path / "d")
    assert _reports_one_failure(run, "x.uqdm", 4, "decompressed"), run.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.png", "c.png", "d.png"]
    for name in "acd":
        assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / f"{name}.png")))

    run = _decompress(ckpt, *files[2:], "--out-dir", tmp_path / "e")
    assert run.code == 0 and run.stdout.strip().endswith("2 inputs decompressed"), (run.stdout, run.stderr)


def test_a_group_that_fails_is_coded_again_image_by_image(ckpt, tmp_path, monkeypatch):
    """Images are coded together; when the group's call fails, each is coded alone, and only the
    image that fails alone is reported."""
    images = [_rgb(tmp_path / f"{name}.png", i) for i, name in enumerate("abc")]
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(images[1])  # the one the codec will refuse
    encode, calls = uqdm.codec.codec._encode, []

    def refusing_black(model, pictures, *args, **kwargs):
        calls.append(len(pictures))
        if any(int(p.max()) == 0 for p in pictures):
            raise uqdm.codec.codec.UQDMError("cannot compress: a black picture (refused by this test)")
        return encode(model, pictures, *args, **kwargs)

    monkeypatch.setattr(uqdm.codec.codec, "_encode", refusing_black)
    run = _compress(ckpt, *images, "--out-dir", tmp_path / "c")
    assert _reports_one_failure(run, "b.png", 3, "compressed"), run.stderr
    assert calls == [3, 1, 1, 1]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.uqdm", "c.uqdm"]


# --- out of memory ------------------------------------------------------------------------------
def test_a_failed_cpu_allocation_suggests_a_smaller_batch_tiles(ckpt, tmp_path):
    """16 tiles of 64×64 in one network call of the tiny model need more than 64 MiB (one tile
    needs less): under an address-space cap of 64 MiB more than now, the allocation really fails
    (portable mode: the fast mode calls the network on one tile at a time)."""
    y, x = np.mgrid[0:256, 0:256]
    Image.fromarray(np.stack([x, y, x ^ y], axis=2).astype(np.uint8)).save(tmp_path / "big.png")
    with memory_cap(64 << 20):
        run = run_cli(["compress", "--ckpt", str(ckpt), str(tmp_path / "big.png"), "-o", str(tmp_path / "big.uqdm"),
                       "--batch-tiles", "16", "--mode", "portable"], time_limit=SLOW)
    assert one_line_error(run), (run.code, run.stderr, run.error)
    assert "out of memory compressing" in run.stderr[0] and "DefaultCPUAllocator" in run.stderr[0]
    assert run.stderr[0].endswith("with --batch-tiles 16") is False and "try a smaller --batch-tiles" in run.stderr[0]
    assert os.listdir(tmp_path) == ["big.png"]


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_a_device_out_of_memory_error_suggests_a_smaller_batch_tiles(command, ckpt, tmp_path, monkeypatch):
    source = _rgb(tmp_path / "a.png", 0)
    assert _compress(ckpt, source, "-o", tmp_path / "a.uqdm", "--mode", "portable").code == 0

    def no_memory(self, z, gamma_t):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    monkeypatch.setattr(uqdm.codec.codec.SubBatched, "forward", no_memory)
    args = ([source, "-o", tmp_path / "b.uqdm", "--mode", "portable"] if command == "compress"
            else [tmp_path / "a.uqdm", "-o", tmp_path / "a.png"])
    run = (_compress if command == "compress" else _decompress)(ckpt, *args, "--batch-tiles", "2")
    assert one_line_error(run), (run.code, run.stderr, run.error)
    assert f"out of memory {command}ing" in run.stderr[0] and "with --batch-tiles 2 (CUDA out of memory" in run.stderr[0]
    assert run.stderr[0].endswith("try a smaller --batch-tiles")


# --- full disks ---------------------------------------------------------------------------------
@pytest.fixture
def disk_room(monkeypatch):
    """`disk_room(n)`: from now on, every file uqdm writes atomically can take n more bytes in all."""
    return lambda room: fill_atomic_writes(room, monkeypatch.setattr)


def _only(folder: Path, *names: str) -> bool:
    """The folder holds exactly these files (no temporary)."""
    return sorted(os.listdir(folder)) == sorted(names)


def test_full_disk_writing_uqdm_and_png_files(ckpt, tmp_path, disk_room):
    a, b = _rgb(tmp_path / "a.png", 0), _rgb(tmp_path / "b.png", 1, 9, 7)
    out = tmp_path / "out"
    assert _compress(ckpt, a, "-o", out / "x.uqdm").code == 0
    assert _decompress(ckpt, out / "x.uqdm", "-o", out / "x.png").code == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.copy(out / "x.uqdm", tmp_path / "a.uqdm")
    assert _compress(ckpt, b, "-o", tmp_path / "b.uqdm").code == 0

    disk_room(40)  # both new files are larger
    run = _compress(ckpt, b, "-o", out / "x.uqdm")
    assert one_line_error(run) and "No space left on device" in run.stderr[0], run.stderr
    run = _decompress(ckpt, tmp_path / "b.uqdm", "-o", out / "x.png")
    assert one_line_error(run) and "No space left on device" in run.stderr[0], run.stderr
    assert _only(out, "x.uqdm", "x.png") and {p.name: p.read_bytes() for p in out.iterdir()} == earlier


FIT = [
    "fit", "--model.n_timesteps=2", "--model.embedding_dim=8", "--model.norm_groups=4", "--model.warmup=1",
    "--data=uqdm.data.SampleImages", "--data.crop_size=8", "--data.batch_size=2", "--data.train_samples=8",
    "--data.val_samples=2", "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--trainer.logger=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.init_args.every_n_train_steps=2", "--trainer.callbacks.init_args.save_top_k=0",
    "--trainer.callbacks.init_args.save_last=true", "--trainer.callbacks+=full_disk.FillDisk",
]
# Run in the checkpoints' mount namespace (where the tmpfs is): the fit, then what it left.
CHECK = ("import os, sys; from uqdm.weights import safe_load; d = sys.argv[1]; "
         "print(sorted(p for p in os.listdir(d) if p != 'filler'), safe_load(d + '/last.ckpt')['global_step'])")


def _fit_on_a_filling_disk(folder: Path, env: dict, mount: bool) -> tuple[subprocess.CompletedProcess, str]:
    """`uqdm fit` whose second checkpoint finds 64 KiB free; its result, and what the checkpoint
    folder then holds (file names, and the global step of last.ckpt)."""
    (folder / "checkpoints").mkdir(parents=True)
    env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
           "FILL_TO_BYTES": "65536",
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    fit = [sys.executable, "-m", "uqdm", *FIT, f"--trainer.default_root_dir={folder}"]
    check = [sys.executable, "-c", CHECK, str(folder / "checkpoints")]
    if not mount:
        run = subprocess.run(fit, cwd=folder, env={**env, "FILL": "writer"}, capture_output=True, text=True, timeout=600)
        return run, subprocess.run(check, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    script = (f"mount -t tmpfs -o size=1m none {folder}/checkpoints && {shlex.join(fit)} 2> {folder}/fit.err; "
              f"echo $? > {folder}/fit.rc; {shlex.join(check)}")
    listing = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=600)
    run = subprocess.CompletedProcess(fit, int((folder / "fit.rc").read_text()), "", (folder / "fit.err").read_text())
    return run, listing.stdout


def _assert_checkpoint_disk_full(run: subprocess.CompletedProcess, left: str) -> None:
    """One line, exit 2; last.ckpt is the first checkpoint's, and loads; no temporary."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("uqdm: ")]
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, run.stderr[-3000:])
    assert lines[0].startswith("uqdm: error: cannot write checkpoint") and "No space left on device" in lines[0]
    assert left.split() == ["['last.ckpt']", "2"]


def test_full_disk_writing_a_checkpoint(tmp_path):
    """The second checkpoint does not fit (a writer made to fail)."""
    _assert_checkpoint_disk_full(*_fit_on_a_filling_disk(tmp_path / "run", dict(os.environ), mount=False))


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not shutil.which("unshare") or not _unshare_works(),
                    reason="cannot mount a tmpfs in a user mount namespace here (the writer-made-to-fail tests run)")
def test_full_tmpfs_for_uqdm_png_and_checkpoint(ckpt, tmp_path):
    """The same on a real small filesystem: a tmpfs mounted in the commands' own mount namespace."""
    disk = tmp_path / "disk"
    disk.mkdir()
    a, b = _rgb(tmp_path / "a.png", 0), _rgb(tmp_path / "b.png", 1, 40, 40)
    assert _compress(ckpt, a, "-o", tmp_path / "a.uqdm").code == 0
    assert _compress(ckpt, b, "-o", tmp_path / "b.uqdm").code == 0
    assert _decompress(ckpt, tmp_path / "a.uqdm", "-o", tmp_path / "a.out.png").code == 0
    uqdm = f"{sys.executable} -m uqdm"
    script = textwrap.dedent(f'''
        set -u
        mount -t tmpfs -o size=64k none {disk}
        cp {tmp_path}/a.uqdm {disk}/x.uqdm && cp {tmp_path}/a.out.png {disk}/x.png
        head -c $(( $(stat -f -c '%a*%S' {disk}) - 4096 )) /dev/zero > {disk}/filler
        {uqdm} compress --ckpt {ckpt} {b} -o {disk}/x.uqdm --tile {TILE} 2> {tmp_path}/compress.err; echo $? > {tmp_path}/compress.rc
        {uqdm} decompress --ckpt {ckpt} {tmp_path}/b.uqdm -o {disk}/x.png 2> {tmp_path}/decompress.err; echo $? > {tmp_path}/decompress.rc
        ls -A {disk} > {tmp_path}/listing
        cmp {disk}/x.uqdm {tmp_path}/a.uqdm && cmp {disk}/x.png {tmp_path}/a.out.png && echo intact > {tmp_path}/intact
    ''')
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env, check=True, timeout=600)
    for command in ("compress", "decompress"):
        err = (tmp_path / f"{command}.err").read_text().splitlines()
        assert (tmp_path / f"{command}.rc").read_text().strip() == "2" and len(err) == 1, err
        assert err[0].startswith("uqdm: error: cannot write") and "No space left on device" in err[0]
    assert (tmp_path / "listing").read_text().split() == ["filler", "x.png", "x.uqdm"]
    assert (tmp_path / "intact").exists()

    # training: the checkpoint folder on a 1 MiB tmpfs, filled to 64 KiB after the first checkpoint
    _assert_checkpoint_disk_full(*_fit_on_a_filling_disk(tmp_path / "run", env, mount=True))


# --- concurrent writers, many files -------------------------------------------------------------
def test_two_processes_writing_the_same_output_leave_one_complete_file(ckpt, tmp_path):
    """Two `uqdm compress` with different seeds to the same -o at once: the file is one of the
    two complete outputs (the atomic rename), and no temporary is left."""
    source = _rgb(tmp_path / "a.png", 0, 24, 24)
    references = []
    for seed in (1, 2):
        assert _compress(ckpt, source, "-o", tmp_path / f"ref{seed}.uqdm", "--seed", seed).code == 0
        references.append((tmp_path / f"ref{seed}.uqdm").read_bytes())
    out = tmp_path / "out" / "a.uqdm"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = [subprocess.Popen([sys.executable, "-m", "uqdm", "compress", "--ckpt", str(ckpt), str(source), "-o", str(out),
                              "--tile", str(TILE), "--seed", str(seed)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) for seed in (1, 2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert out.read_bytes() in references and references[0] != references[1]
    assert os.listdir(out.parent) == ["a.uqdm"]


MANY_FILES = r"""
import json, os, sys
import numpy as np
from PIL import Image
import torch
torch.set_num_threads(1)
from uqdm.cli import main
from uqdm.codec.fuzz import save_module, tiny_module

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

work, n = sys.argv[1], int(sys.argv[2])
ckpt = save_module(tiny_module(), f"{work}/tiny.ckpt")
rng = np.random.default_rng(0)
for i in range(n):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(f"{work}/{i:04d}.png")
out, first = {}, 50
for command, inputs, options in (("compress", [f"{work}/{i:04d}.png" for i in range(n)], ["--out-dir", f"{work}/c", "--tile", "8"]),
                                 ("decompress", [f"{work}/c/{i:04d}.uqdm" for i in range(n)], ["--out-dir", f"{work}/d"])):
    for start, stop in ((0, first), (first, n)):  # the first files warm up; RSS after them, then at the end
        try:
            main([command, "--ckpt", ckpt, *inputs[start:stop], *options])
        except SystemExit as e:
            assert not e.code, e.code
        out[f"{command}_{stop}"] = rss()
print(json.dumps(out))
"""


def test_memory_stays_flat_over_many_files(tmp_path):
    """RSS after the first 50 files and after 300, for compress and for decompress in one process:
    the 250 files in between add less than 16 MiB (they are read and written one at a time)."""
    n = 300
    run = subprocess.run([sys.executable, "-c", MANY_FILES, str(tmp_path), str(n)], capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    print(rss)
    for command in ("compress", "decompress"):
        assert rss[f"{command}_{n}"] - rss[f"{command}_50"] < 16 << 20, rss
