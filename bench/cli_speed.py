"""Benchmark 5: the codec as a user runs it, against the paper's evaluation pass, side by side.

- paper pass: one denoise evaluation of the 24 Kodak 64×64 images written the paper's way: the
  released network in float32 with the explicit einsum/softmax attention, one image at a time, 4
  network calls per image (per step: the prior at z_t and its denoised picture, then z_s drawn
  from the posterior). Timed in-process after loading, so start-up is not counted (which favours
  the reference).
- codec, per mode: `uqdm compress` of the 24 PNGs, then `uqdm decompress` of the 24 files, as two
  processes (start-up, model load and file I/O included), wall time; the decoded PNGs are
  compared with the inputs.

The three are timed in alternation, `rounds` times; each ratio is the median over rounds of
codec time / paper-pass time in the same round (the machine may be shared).

What no fast codec can go below, measured in the same rounds: two processes' start-up (a process
that imports torch and loads the checkpoint, nothing else; compress and decompress each pay it) plus
the fast mode's network calls alone (2·T float32 calls per image: T to encode, T to decode, as
`fast.PerTile` makes them, in-process). `fast_floor_over_paper_pass` is that sum over the paper's
pass: a target below it cannot be met on this machine by any change to the codec around the network.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codec import kodak64, missing_data, released_checkpoint
from uqdm.weights import load_model
from uqdm.codec.codec import codec_model
from uqdm.codec.container import MODES
from uqdm.diffusion import to_centered
from uqdm.images import load_image, save_png
from uqdm.network import Attention

IMAGES = 24


@torch.inference_mode()
def paper_pass(model, images: list[torch.Tensor]) -> float:
    """Seconds of one denoise evaluation pass, float32 einsum attention, one image per call."""
    start = time.perf_counter()
    for image in images:
        x = to_centered(image[None])
        z = model.sample_top(x)
        for i in range(model.n_timesteps):
            st = model.step(i)
            prior = model.prior(z, st)
            model.decode_argmax(prior.x_hat)
            z = model.sample_posterior(model.posterior_mean(x, z, st), st)
        model.decode_argmax(z)
    return time.perf_counter() - start


def startup(ckpt: Path) -> float:
    """Wall seconds of a process that imports torch and loads the checkpoint, and does nothing else."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from uqdm.weights import load_model; load_model(sys.argv[1])",
                    str(ckpt)], check=True)
    return time.perf_counter() - start


@torch.inference_mode()
def fast_network(model, images: list[torch.Tensor]) -> float:
    """Seconds of the fast mode's network calls alone for compress plus decompress of `images`:
    2·T calls of `fast.PerTile` per image, all images' tiles per call, as the CLI's compress makes them."""
    net = codec_model(model, mode="fast")
    per_tile = net.network.network  # the windows' network (`fast.PerTile`): a 64×64 image is one window
    tiles = to_centered(torch.stack(images)).double()
    gamma = net.gamma_at(0.5)
    start = time.perf_counter()
    for _ in range(2 * net.n_timesteps):
        per_tile(tiles, gamma)
    return time.perf_counter() - start


def cli_round_trip(ckpt: Path, pngs: list[Path], work: Path, mode: str) -> float:
    """Wall seconds of `uqdm compress` then `uqdm decompress` of `pngs`, two processes."""
    files, out = work / f"files-{mode}", work / f"out-{mode}"
    uqdm = [sys.executable, "-m", "uqdm"]
    start = time.perf_counter()
    subprocess.run([*uqdm, "compress", "--ckpt", str(ckpt), *map(str, pngs), "--out-dir", str(files),
                    "--mode", mode], check=True, capture_output=True)
    subprocess.run([*uqdm, "decompress", "--ckpt", str(ckpt), *map(str, sorted(files.glob("*.uqdm"))),
                    "--out-dir", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def run(rounds: int = 2, workdir: Path | None = None) -> dict:
    reason = missing_data()
    if reason:
        return {"skipped": reason}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        ckpt = released_checkpoint(work)
        images = kodak64(IMAGES)
        pngs = []
        for i, image in enumerate(images):
            pngs.append(work / f"kodak{i:02d}.png")
            save_png(image, pngs[-1])
        model = load_model(ckpt).float().eval()
        for m in model.modules():
            if isinstance(m, Attention):
                m.kind = "einsum"
        paper_pass(model, images[:1])  # warm-up
        uqdm = load_model(ckpt)
        fast_network(uqdm, images[:1])  # warm-up
        times = {"paper_pass": [], **{mode: [] for mode in MODES}, "startup": [], "fast_network": []}
        for r in range(rounds):
            times["paper_pass"].append(paper_pass(model, images))
            for mode in MODES:
                times[mode].append(cli_round_trip(ckpt, pngs, work, mode))
            times["startup"].append(startup(ckpt))
            times["fast_network"].append(fast_network(uqdm, images))
            print(f"cli_speed round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
        exact = {mode: all(torch.equal(load_image(work / f"out-{mode}" / p.name), image)
                           for p, image in zip(pngs, images)) for mode in MODES}
    ratios = {mode: statistics.median(t / p for t, p in zip(times[mode], times["paper_pass"])) for mode in MODES}
    floor = statistics.median((2 * s + n) / p for s, n, p in zip(times["startup"], times["fast_network"],
                                                                  times["paper_pass"]))
    return {
        "images": IMAGES,
        "rounds": rounds,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        **{f"{mode}_over_paper_pass": ratios[mode] for mode in MODES},
        "exact": exact,
        "target_max": 0.5,
        "fast_met": ratios["fast"] <= 0.5,
        "fast_floor_over_paper_pass": floor,
        "target_reachable": floor <= 0.5,
        "notes": "codec: two CLI processes (compress, decompress) wall time; paper pass: in-process, "
                 "float32 einsum attention, 4 calls per image; floor: 2 × (python + import torch + load "
                 "model) + the fast mode's 2·T network calls per image; ratios: median over alternating rounds",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
