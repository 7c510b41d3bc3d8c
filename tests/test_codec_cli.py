"""`uqdm compress` / `decompress` as a user meets them: a progress bar over steps and tiles on a
terminal only (`--quiet` silences it; a pipe sees the plain output), `--device`, and several files
decoded at once on all of torch's threads, bit for bit as one at a time, reported in input order."""

import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import uqdm.codec.codec
from uqdm.cli import main, tools_parser
from uqdm.codec.container import truncate
from uqdm.codec.fuzz import one_line_error, run_cli
from uqdm.progress import Progress, visible

from terminal import terminal_stderr

TILE = 4


def _rgb(path: Path, seed: int, h: int = 6, w: int = 5) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _last_count(text: str) -> tuple[int, int]:
    """The last `n/total` a bar drew."""
    n, total = re.findall(r"\| *(\d+)/(\d+) \[", text)[-1]
    return int(n), int(total)


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


# --- the progress bar ---------------------------------------------------------------------------
def test_the_bar_is_drawn_only_on_a_terminal_and_not_with_quiet(capsys):
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert visible(False, tty) and not visible(True, tty)
    finally:
        os.close(master)
        os.close(slave)
    assert not visible(False, sys.stdout)  # captured by pytest: not a terminal


def test_a_task_advances_by_its_steps_when_it_ends_and_goes_back_when_it_fails():
    with terminal_stderr() as shown, Progress(2 * 3 + 3, "test", quiet=False) as bar:
        with bar.task(2, 3) as (on_chunk, on_windows):  # two inputs of three chunks
            on_chunk(0), on_chunk(1)
            time.sleep(0.15)
            on_windows(3, 18)
            assert _last_count(shown()) == (2, 9) and shown().endswith("windows 3/18]"), shown()  # within a step
            on_windows(18, 18), on_chunk(2)
        assert _last_count(shown()) == (6, 9) and "windows" not in shown().rsplit("\r", 1)[-1], shown()
        with pytest.raises(RuntimeError), bar.task(1, 3) as (on_chunk, on_windows):
            on_chunk(1)
            raise RuntimeError("the codec call failed")
        assert _last_count(shown()) == (6, 9)


def _passes(calls: list[tuple[int, int]]) -> list[int]:
    """The totals of the network passes that `on_windows(done, total)` reported, each checked to
    count up to its own total before the next one begins."""
    passes, done_before, total_before = [], 0, 0
    for done, total in calls:
        if done_before == total_before:  # the last pass ended: a new one
            passes.append(total)
            done_before = 0
        assert total == passes[-1] and done_before < done <= total, calls
        done_before, total_before = done, total
    assert done_before == total_before, calls
    return passes


def test_the_window_count_is_of_the_pass_under_way(module, one_thread):
    """On the shifted grid an odd step runs more windows than tiles (one more per shifted axis),
    and the pictures of lossy points blend over four grids: each pass counts to its own total."""
    image = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    calls = []
    data = uqdm.codec.codec.compress(module.model, [image], tile=TILE, grid_kind="shifted",
                                     on_windows=lambda done, total: calls.append((done, total)))[0]
    assert _passes(calls) == [2 * 2, 3 * 3]  # 2×2 tiles: step 0 on the tiles, step 1 on the shifted grid
    calls.clear()
    uqdm.codec.codec.decompress(module.model, data, all_points=True,
                                on_windows=lambda done, total: calls.append((done, total)))
    blended = 2 * 2 + 2 * 3 + 3 * 2 + 3 * 3
    assert set(_passes(calls)) == {2 * 2, 3 * 3, blended}


def test_compress_and_decompress_draw_a_bar_on_a_terminal_only(ckpt, tmp_path, one_thread):
    images = [_rgb(tmp_path / f"{name}.png", i) for i, name in enumerate("ab")]
    with terminal_stderr() as shown:
        assert _cli(["compress", "--ckpt", str(ckpt), *map(str, images), "--out-dir", str(tmp_path / "c"),
                     "--tile", str(TILE)]) == 0
        drawn = shown()
    assert "compress: " in drawn and _last_count(drawn) == (6, 6), drawn  # 2 images × (T = 2, + lossless)
    assert re.search(r"windows [1-8]/8\]", drawn), drawn  # 2 × 2 tiles of 4×4 in each 6×5 image, coded together

    files = [str(tmp_path / "c" / f"{name}.uqdm") for name in "ab"]
    with terminal_stderr() as shown:
        assert _cli(["decompress", "--ckpt", str(ckpt), *files, "--out-dir", str(tmp_path / "d")]) == 0
        drawn = shown()
    assert "decompress: " in drawn and _last_count(drawn) == (6, 6), drawn

    with terminal_stderr() as shown:
        assert _cli(["decompress", "--ckpt", str(ckpt), *files, "--out-dir", str(tmp_path / "q"), "--quiet"]) == 0
        assert shown() == ""
    run = run_cli(["decompress", "--ckpt", str(ckpt), *files, "--out-dir", str(tmp_path / "p")])  # stderr: a pipe
    assert run.code == 0 and run.stderr == [] and run.stdout == "2 inputs decompressed\n", run


# --- --device ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_device_cuda_without_a_gpu_is_one_line(command, ckpt, tmp_path):
    source = _rgb(tmp_path / "a.png", 0) if command == "compress" else tmp_path / "a.uqdm"
    if command == "decompress":
        source.write_bytes(b"not read: the device is checked first")
    run = run_cli([command, "--ckpt", str(ckpt), str(source), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert one_line_error(run) and "--device cuda" in run.stderr[0], run
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_the_model_runs_on_the_cpu_unless_told(command):
    """A fast-mode file made on a GPU would not decode on a CPU: the GPU is asked for, not assumed."""
    assert tools_parser(command).parse_args([command, "--ckpt", "c", "x", "-o", "y"]).device == "cpu"


def test_device_cpu_and_auto_make_the_same_file(ckpt, tmp_path, one_thread):
    image = _rgb(tmp_path / "a.png", 0)
    for device in ("cpu", "auto"):
        run = run_cli(["compress", "--ckpt", str(ckpt), str(image), "-o", str(tmp_path / f"{device}.uqdm"),
                       "--tile", str(TILE), "--device", device])
        assert run.code == 0, run
        run = run_cli(["decompress", "--ckpt", str(ckpt), str(tmp_path / f"{device}.uqdm"),
                       "-o", str(tmp_path / f"{device}.png"), "--device", device])
        assert run.code == 0, run
    assert (tmp_path / "cpu.uqdm").read_bytes() == (tmp_path / "auto.uqdm").read_bytes()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cpu.png")), np.asarray(Image.open(image)))


# --- several files at once -----------------------------------------------------------------------
@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_several_files_decode_at_once_bit_for_bit_in_input_order(ckpt, tmp_path, monkeypatch, two_threads):
    """With 2 torch threads, 2 files decode at a time, each on one thread; the PNGs equal those of a
    decode one file at a time, and warnings and failures come in input order."""
    images = [_rgb(tmp_path / f"{name}.png", i, 9, 7) for i, name in enumerate("abcdef")]
    # making the files is no hang check (the fuzzer's 5 s watchdog fired here on a loaded machine)
    for run in (run_cli(["compress", "--ckpt", str(ckpt), *map(str, images), "--out-dir", str(tmp_path / "c"),
                         "--tile", str(TILE), "--mode", "portable"], time_limit=120),
                run_cli(["compress", "--ckpt", str(ckpt), *map(str, images[:2]), "--out-dir", str(tmp_path / "f"),
                         "--tile", str(TILE)], time_limit=120)):
        assert run.error is None and run.code == 0, (run.error, run.stderr)
    files = [tmp_path / "c" / f"{name}.uqdm" for name in "abcdef"] + [tmp_path / "f" / f"{n}.uqdm" for n in "ab"]
    files[6], files[7] = files[6].rename(tmp_path / "f" / "g.uqdm"), files[7].rename(tmp_path / "f" / "h.uqdm")
    whole = files[1].read_bytes()
    files[1].write_bytes(whole[: len(truncate(whole, steps=2)) + 3])  # ends inside a layer: a warning
    files[3].write_bytes(b"garbage")
    files[4].write_bytes(truncate(files[4].read_bytes(), steps=1))  # a lossy prefix

    decode, running, most = uqdm.codec.codec.decompress, [0], [0]
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            assert torch.get_num_threads() == 1
            time.sleep(0.2)
            return decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(uqdm.codec.codec, "decompress", counted)
    run = run_cli(["decompress", "--ckpt", str(ckpt), *map(str, files), "--out-dir", str(tmp_path / "two"),
                   "--method", "ancestral"], time_limit=120)
    assert most[0] == 2 and torch.get_num_threads() == 2
    assert run.code == 2 and [line.split(":")[1:3] for line in run.stderr] == [
        [" warning", f" {files[1]}"], [" error", f" {files[3]}"], [" error", " 1 of 8 inputs failed; 7 decompressed"]
    ], run.stderr

    torch.set_num_threads(1)
    most[0] = 0
    one = run_cli(["decompress", "--ckpt", str(ckpt), *map(str, files), "--out-dir", str(tmp_path / "one"),
                   "--method", "ancestral"], time_limit=120)
    assert most[0] == 1 and one.stderr == run.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 7
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
