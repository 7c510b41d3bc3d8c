"""Benchmarks 3 and 4: the codec with the released tiny weights, and how its time scales.

3. (`run`) Encode and decode milliseconds per 64×64 Kodak image at batch 1 and batch 32, the share
   of that time spent building probability tables and entropy coding, file bits over ideal bits,
   the same for one full 768×512 Kodak image with its peak memory, and a profile of one network
   forward in float32 (the fast mode's precision, also on one tile and one thread as the fast
   mode calls it) and in float64 (the portable mode's) with two layout/compiler variants.
4. (`run_scaling`) Codec time against image area (64×64 … 768×512) and against the number of steps
   T (1 … 16), each series with a linearity verdict, and peak memory against area.

How the time is split. The benchmark calls only `compress` and `decompress` and replaces nothing:
each timed call runs under Python's deterministic profiler (`cProfile`, with C calls folded into
the Python function that makes them), and the parts are read from the profile's call graph:
  tables     = time in the modules `codec.tables` and `codec.exact` when entered from elsewhere,
               less the rate report below
  coder      = time in `codec.coder` when entered from elsewhere (constriction calls, symbol
               shuffling), less the tables it builds
  ideal_bits = `tables.ideal_step_bits` and `DiscreteDiffusion.log_likelihood` (the decoder's rate
               report of the step and lossless chunks)
  network    = `PerTile.forward` (the fast mode's network calls, whose tiles may run on other
               threads, which the profiler does not see) or else `ScoreNetwork.forward` (the
               portable mode's)
  other      = the rest (latent arithmetic, shared draws, fingerprint, model copy, packing)
`coding_share` = (tables + coder) / codec wall time. The wall times are those of the profiled
calls; the profiler adds a little to the Python-heavy parts (tables, coder).

How peak memory is measured. The 768×512 image runs in a fresh Python process (the smaller area
points of section 4 share a second one, in ascending size): imports, model load and a warm-up
round trip of a 64×64 image first; then, before each image, the freed heap is returned to the OS
(`malloc_trim`), the resident set is read (`VmRSS`, the baseline),
the kernel's peak-RSS mark is reset (`/proc/self/clear_refs` ← 5) and read back (`VmHWM`) after
encoding and again (reset in between) after decoding. `peak_mib` = max(VmHWM) − baseline: the
memory the image itself needs. Where clear_refs is not writable, `ru_maxrss` (lifetime peak) is
used instead and `peak_method` says so.

Threads. Batch 1 is timed at 1 thread and at torch's default (the machine's cores); the rest of
both sections runs at the faster of the two (`codec.threads`, `batch1.by_threads` has both). The
codec's table building is hundreds of small tensor operations per step: with two threads each
one waits at a barrier for the second core, which a busy machine does not give it in time.

Repeats. Small cases are a median of 3 after a warm-up; an expensive case (batch-32 encode, the
768×512 image, the area and large-T points) is timed once after a warm-up (`repeats` says which),
so that `make bench` stays within 10 minutes on 2 cores. Batch-32 decode is one file per call (the
decoder takes one file): its figure is the median over the 32 files. `BENCH_COMPILE=1` adds the
`torch.compile` variant of the float64 network (its compilation alone takes minutes on 2 cores).

FLOPs. `profile.gflop_per_image` counts attention by formula (`flops.py`: `FlopCounterMode` does not
see PyTorch's fused CPU attention kernel); at 64×64 attention is two thirds of the forward.
"""

import copy
import cProfile
import ctypes
import gc
import inspect
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flops import forward_flops, matmul_peak_gflops, share_of_peak
from timing import median_seconds
from uqdm.codec import coder, compress, decompress, exact, parse, tables
from uqdm.codec.codec import BATCH_TILES
from uqdm.codec.fast import PerTile
from uqdm.diffusion import DiscreteDiffusion
from uqdm.hyperparameters import build_model, model_arguments
from uqdm.images import box_resize, box_resize_center_crop, load_image
from uqdm.network import ScoreNetwork
from uqdm.released import import_official
from uqdm.weights import load_model, safe_load, save_checkpoint

SHARED = Path(os.environ.get("UQDM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RELEASED = SHARED / "official" / "uqdm-tiny"
KODAK = SHARED / "kodak"
FULL_IMAGE = "kodim01.png"  # 768×512, landscape
FULL_SIZE = (512, 768)  # (H, W): all of it
AREA_SIZES = ((64, 64), (128, 128), (256, 256))  # (H, W) crops; the 512×768 point is section 3's
STEPS = (1, 2, 4, 8, 16)
LINEAR_TOLERANCE = 0.15  # a series is linear when every point lies within 15% of its affine fit
PAPER_REFERENCE = "0/denoise"  # the paper's single evaluation pass in reference-kodak64.json
LABELS = ("tables", "coder", "ideal_bits", "network")


# --- timing the codec's parts from outside ----------------------------------------------------
def _key(fn) -> tuple[str, int, str]:
    """The key `pstats` files a Python function under."""
    code = fn.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def _files(*modules) -> frozenset[str]:
    return frozenset(inspect.getsourcefile(m) for m in modules)


TABLE_FILES = _files(tables, exact)  # probability tables and the arithmetic they are built with
CODER_FILES = _files(coder)  # the constriction calls and the symbol shuffling around them
IDEAL_BITS = (_key(tables.ideal_step_bits), _key(DiscreteDiffusion.log_likelihood))  # the decoder's rate report
NETWORK = (_key(PerTile.forward), _key(ScoreNetwork.forward))  # the first one present


class Timers:
    """Wall seconds of the codec calls made through `call`, and the time inside each part of them,
    read from a deterministic profile (`cProfile`, C calls folded into their Python caller)."""

    def __init__(self):
        self.wall = 0.0
        self.profile = cProfile.Profile(builtins=False)

    def call(self, fn, *args, **kwargs):
        """Run one codec call under the profiler, adding its wall time to the total; return
        (result, seconds)."""
        start = time.perf_counter()
        self.profile.enable()
        try:
            out = fn(*args, **kwargs)
        finally:
            self.profile.disable()
        seconds = time.perf_counter() - start
        self.wall += seconds
        return out, seconds

    def seconds(self) -> dict[str, float]:
        """Seconds per part: the time spent in a part's functions when entered from outside it,
        less what the coder spends in the tables it asks for (each second counts once)."""
        stats = pstats.Stats(self.profile).stats
        edges = [(caller, callee, ct) for callee, (*_, callers) in stats.items()
                 for caller, (_, _, _, ct) in callers.items()]

        def entered(files: frozenset[str], skip=()) -> float:
            return sum(ct for caller, callee, ct in edges
                       if callee[0] in files and caller[0] not in files and callee not in skip)

        from_coder = sum(ct for caller, callee, ct in edges if caller[0] in CODER_FILES and callee[0] in TABLE_FILES)
        return {
            "tables": entered(TABLE_FILES, skip=IDEAL_BITS),
            "coder": entered(CODER_FILES) - from_coder,
            "ideal_bits": sum(stats[k][3] for k in IDEAL_BITS if k in stats),
            "network": next((stats[k][3] for k in NETWORK if k in stats), 0.0),
        }

    def shares(self) -> dict:
        return shares(self.seconds(), self.wall)


def shares(seconds: dict[str, float], wall: float) -> dict:
    """Each part's share of the codec's wall time, the rest (`other`), and tables + coder."""
    out = {f"{k}_share": seconds[k] / wall for k in LABELS}
    out["other_share"] = 1.0 - sum(out.values())
    out["coding_share"] = out["tables_share"] + out["coder_share"]
    return out


def merged_shares(*timers: Timers) -> dict:
    seconds = [t.seconds() for t in timers]
    return shares({k: sum(s[k] for s in seconds) for k in LABELS}, sum(t.wall for t in timers))


# --- data ---------------------------------------------------------------------------------------
def released_checkpoint(directory: Path) -> Path:
    """The released tiny weights (averaged network and schedule) imported into a uqdm checkpoint."""
    path = directory / "tiny-ema.ckpt"
    save_checkpoint(import_official(RELEASED), path)
    return path


def kodak64(n: int) -> list[torch.Tensor]:
    """The 24 Kodak evaluation crops (box-downsampled short side 64, centre 64×64), then left-edge
    64×64 crops of the same downsampled images until there are `n`."""
    paths = sorted(KODAK.glob("kodim*.png"))
    images = [box_resize_center_crop(load_image(p), 64) for p in paths][:n]
    for p in paths[: n - len(images)]:
        images.append(box_resize(load_image(p), 64)[:, :64, :64].contiguous())
    return images


def missing_data() -> str | None:
    if not (RELEASED / "checkpoint.pt").is_file() or not (KODAK / FULL_IMAGE).is_file():
        return f"released tiny weights or Kodak images not found under {SHARED}"
    return None


def file_figures(files: list[bytes], decoded: list) -> dict:
    """File bits over the ideal bits (−log₂ of the coded symbols under the unquantised model)."""
    file_bits = 8 * sum(len(f) for f in files)
    payload_bits = 8 * sum(len(c) for f in files for c in parse(f).layers)
    ideal = sum(sum(d.ideal_bits) for d in decoded)
    return {"file_bits": file_bits, "ideal_bits": ideal, "overhead": file_bits / ideal - 1,
            "payload_overhead": payload_bits / ideal - 1}


# --- section 3 ----------------------------------------------------------------------------------
def round_trips(module, image: torch.Tensor, budget_s: float, enc: Timers, dec: Timers, repeats: int = 3):
    """Encode and decode `image` `repeats` times (once when the first round trip alone takes more
    than a third of `budget_s`) through `enc` and `dec`; return both lists of seconds, the last
    file and its decoding."""
    enc_times, dec_times = [], []
    while len(enc_times) < repeats:
        files, seconds = enc.call(compress, module, [image])
        enc_times.append(seconds)
        decoded, seconds = dec.call(decompress, module, files[0])
        dec_times.append(seconds)
        if (enc_times[0] + dec_times[0]) * repeats > budget_s:
            break
    return enc_times, dec_times, files[0], decoded


def batch1(module, image: torch.Tensor, budget_s: float = 15.0) -> tuple[dict, bytes]:
    """One 64×64 image per call (already warmed up): median of 3 encodes and 3 decodes, or of 1
    when the first round trip alone takes more than a third of `budget_s`."""
    enc, dec = Timers(), Timers()
    enc_times, dec_times, data, decoded = round_trips(module, image, budget_s, enc, dec)
    return {
        "repeats": len(enc_times),
        "encode_ms": 1e3 * statistics.median(enc_times),
        "decode_ms": 1e3 * statistics.median(dec_times),
        "encode_coding_share": enc.shares()["coding_share"],
        "decode_coding_share": dec.shares()["coding_share"],
        **merged_shares(enc, dec),
        "exact": torch.equal(decoded.image, image),
        **file_figures([data], [decoded]),
    }, data


def batch(module, images: list[torch.Tensor], encode_budget_s: float = 30.0) -> dict:
    """All images in one `compress` call (median of 3, or 1 when one call alone takes more than a
    third of `encode_budget_s`), once more with one tile per network call instead of the codec's
    default sub-batch, then every file decoded once (median over the files)."""
    enc, dec = Timers(), Timers()
    files, first = enc.call(compress, module, images)
    times = [first]
    while len(times) < 3 and first * 3 <= encode_budget_s:
        files, seconds = enc.call(compress, module, images)
        times.append(seconds)
    # the codec's own knob, tiles per network call (its bytes do not depend on it): 1 against 4
    start = time.perf_counter()
    one_tile = compress(module, images, batch_tiles=1)
    one_tile_s = time.perf_counter() - start
    decoded, dec_times = [], []
    for data in files:
        d, seconds = dec.call(decompress, module, data)
        decoded.append(d)
        dec_times.append(seconds)
    n = len(images)
    kodak24 = [sum(d.ideal_bits) / 4096 for d in decoded[:24]]
    return {
        "images": n,
        "encode_repeats": len(times),
        "encode_ms": 1e3 * statistics.median(times) / n,
        "decode_ms": 1e3 * statistics.median(dec_times),
        "decode_ms_mean": 1e3 * statistics.mean(dec_times),
        "encode_ms_batch_tiles_1": 1e3 * one_tile_s / n,
        "batch_tiles_1_same_bytes": one_tile == files,
        "encode_coding_share": enc.shares()["coding_share"],
        "decode_coding_share": dec.shares()["coding_share"],
        **merged_shares(enc, dec),
        "exact": all(torch.equal(d.image, x) for d, x in zip(decoded, images)),
        **file_figures(files, decoded),
        "kodak24_bpp": statistics.mean(kodak24) if len(kodak24) == 24 else None,
    }


def worker(ckpt: Path, sizes, threads: int) -> list[dict]:
    """Each (H, W) crop of the full image measured in a fresh process (see the module docstring)."""
    args = json.dumps({"ckpt": str(ckpt), "sizes": [list(s) for s in sizes], "threads": threads})
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", args],
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"codec benchmark worker failed:\n{run.stderr[-4000:]}")
    line = next(line for line in reversed(run.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run(workdir: Path | None = None, batch_size: int = 32) -> dict:
    """Section 3: the codec with the released tiny weights.

    Batch 1 is timed at 1 thread and at torch's default; everything after runs at the faster of
    the two (`threads`): the codec's table building is many small tensor operations, and with a
    second thread each one waits at a barrier for a core that a busy machine may not give it.
    """
    reason = missing_data()
    if reason:
        return {"skipped": reason}
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ckpt = released_checkpoint(Path(tmp))
        module = load_model(ckpt)
        images = kodak64(batch_size)
        torch.set_num_threads(1)
        decompress(module, compress(module, [images[0]])[0])  # warm-up
        by_threads, files = {}, {}
        for n in sorted({1, default_threads}):
            torch.set_num_threads(n)
            by_threads[n], files[n] = batch1(module, images[0])
        threads = min(by_threads, key=lambda n: by_threads[n]["encode_ms"] + by_threads[n]["decode_ms"])
        torch.set_num_threads(threads)
        try:
            b32 = batch(module, images)
            full = worker(ckpt, [FULL_SIZE], threads)[0]
            prof = profile_network(module, images[0])
        finally:
            torch.set_num_threads(default_threads)
    b1 = {**by_threads[threads],
          "same_bytes_across_threads": len(set(files.values())) == 1,
          "by_threads": {str(n): {k: r[k] for k in ("repeats", "encode_ms", "decode_ms", "coding_share")}
                         for n, r in by_threads.items()}}
    reference = json.loads((RELEASED / "reference-kodak64.json").read_text())
    paper_ms = 1e3 * reference["runs"][PAPER_REFERENCE]["time_s"] / reference["images"]
    codec_ms = b32["encode_ms"] + b32["decode_ms"]
    return {
        "weights": "released uqdm-tiny, ema (T = 4)",
        "threads": threads,
        "batch1": b1,
        f"batch{batch_size}": b32,
        "overhead_64": b32["overhead"],
        "full": full,
        "profile": prof,
        "targets": {
            "coding_share_max": 0.10,
            "coding_share_met": b32["coding_share"] <= 0.10,
            "paper_ms_per_image": paper_ms,
            "codec_ms_per_image": codec_ms,
            "codec_over_paper": codec_ms / paper_ms,
            "codec_over_paper_max": 0.5,
            "speed_met": codec_ms <= 0.5 * paper_ms,
            "full_peak_mib_max": 2048,
            "peak_met": full["peak_mib"] < 2048,
        },
        "load_avg_1min": [load_start, os.getloadavg()[0]],
        "wall_s": time.perf_counter() - start,
        "notes": ("shares: exclusive wall time of wrapped codec functions (bench/codec.py docstring); "
                  "full: fresh process, 1 timed run after a 64x64 warm-up, peak = VmHWM - VmRSS baseline; "
                  "paper_ms_per_image: recorded in reference-kodak64.json (2 cores), not re-run here"),
    }


# --- the network forward: profile and variants ----------------------------------------------------
def op_shares(net, z, gamma) -> dict:
    """Self CPU time of one forward under torch.profiler, grouped: attention, convolution, rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(z, gamma)
    groups = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        group = next((g for g in ("attention", "conv", "norm") if g in name), "rest")
        groups[group] += event.self_cpu_time_total
    total = sum(groups.values())
    return {f"{g}_share": groups[g] / total for g in ("attention", "conv", "norm", "rest")}


class ChannelsLast(torch.nn.Module):
    """The network with channels-last weights, fed channels-last inputs."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.to(memory_format=torch.channels_last)
        self.n_channels = network.n_channels

    def forward(self, z, gamma):
        return self.network(z.contiguous(memory_format=torch.channels_last), gamma)


def with_network(module, wrap) -> torch.nn.Module:
    """A copy of the diffusion model whose network is `wrap(network)`: handed to the codec, its
    float64 copy runs the variant."""
    model = copy.deepcopy(module)
    model.network = wrap(model.network)
    return model


@torch.inference_mode()
def profile_network(module, image: torch.Tensor, batch_tiles: int = BATCH_TILES) -> dict:
    """One forward of the released network on `batch_tiles` 64×64 latents (the portable mode's
    sub-batch): float32 against float64, where the time goes, float32 on one tile and one thread
    (the fast mode's call), and variants of the float64 forward that leave the portable mode's
    bytes unchanged (checked by compressing `image` again)."""
    reference_file = compress(module, [image], mode="portable")[0]
    net32 = copy.deepcopy(module.network).eval()
    z = torch.randn(batch_tiles, 3, 64, 64)
    gamma = module.gamma_at(0.5).detach()
    counted = forward_flops(net32, z, gamma)
    flops = counted["total"]
    out = {"batch": batch_tiles, "gflop_per_image": flops / batch_tiles / 1e9,
           "attention_flop_share": counted["attention"] / flops}
    nets = {"f32": (net32, z, gamma), "f64": (copy.deepcopy(net32).double(), z.double(), gamma.double())}
    for name, (net, x, g) in nets.items():
        seconds = median_seconds(lambda: net(x, g), repeats=3)
        peak = matmul_peak_gflops(x.dtype)
        out[name] = {"ms_per_image": 1e3 * seconds / batch_tiles, "gflops": flops / seconds / 1e9,
                     "mm_peak_gflops": peak, "share_of_peak": share_of_peak(lambda: net(x, g), flops, x.dtype, rounds=3),
                     **op_shares(net, x, g)}
    out["f64_over_f32"] = out["f64"]["ms_per_image"] / out["f32"]["ms_per_image"]
    net64, x64, g64 = nets["f64"]
    # the codec's sub-batch (tiles per network call) against one tile per call
    out["f64"]["batch1_ms_per_image"] = 1e3 * median_seconds(lambda: net64(x64[:1], g64), repeats=3)
    out["f64"]["batch1_over_batch4"] = out["f64"]["batch1_ms_per_image"] / out["f64"]["ms_per_image"]
    # the fast mode's call: float32, one tile, one thread, against the one-thread float32 peak
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = median_seconds(lambda: net32(z[:1], gamma), repeats=3)
        share = share_of_peak(lambda: net32(z[:1], gamma), flops // batch_tiles, torch.float32, rounds=3)
    finally:
        torch.set_num_threads(threads)
    out["f32_one_tile_one_thread"] = {"ms_per_image": 1e3 * seconds, "gflops": flops / batch_tiles / seconds / 1e9,
                                      "share_of_one_thread_peak": share}
    # variants, each timed against the plain float64 forward in the same stretch of time
    variants = {"channels_last": ChannelsLast}
    if os.environ.get("BENCH_COMPILE") == "1":
        variants["compile"] = torch.compile
    for name, wrap in variants.items():
        net = wrap(copy.deepcopy(net64))
        start = time.perf_counter()
        net(x64, g64)
        first_s = time.perf_counter() - start
        t_variant = median_seconds(lambda: net(x64, g64), repeats=3)
        t_plain = median_seconds(lambda: net64(x64, g64), repeats=3)
        # the header's fingerprint names the network's class, so only the payloads can agree
        same = (parse(compress(with_network(module, wrap), [image], mode="portable")[0]).layers
                == parse(reference_file).layers)
        out[f"f64_{name}"] = {"over_plain": t_variant / t_plain, "first_call_s": first_s, "same_bytes": same}
    return out


# --- section 4 ----------------------------------------------------------------------------------
def linearity(xs: list[float], ys: list[float], unit: str, tolerance: float = LINEAR_TOLERANCE) -> dict:
    """Affine fit y ≈ a + b·x (least squares on relative error); linear when every point is
    within `tolerance` of the fit and the fixed part `a` is not negative beyond it."""
    w = [1 / y**2 for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    b = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    a = (sy - b * sx) / sw
    deviation = [(y - (a + b * x)) / (a + b * x) for x, y in zip(xs, ys)]
    worst = max(range(len(xs)), key=lambda i: abs(deviation[i]))
    per_unit = [y / x for x, y in zip(xs, ys)]
    linear = abs(deviation[worst]) <= tolerance
    if linear:
        verdict = f"linear: every point within {abs(deviation[worst]):.0%} of {a:.0f} ms + {b:.4g} ms per {unit}"
    else:
        verdict = (f"not linear at {xs[worst]:g} {unit}: {deviation[worst]:+.0%} off the fit "
                   f"{a:.0f} ms + {b:.4g} ms per {unit}")
    if per_unit[0] > 1.25 * per_unit[-1]:
        verdict += f"; the smallest case costs {per_unit[0] / per_unit[-1]:.2f}x per {unit} (fixed {a:.0f} ms per call)"
    return {"fixed_ms": a, f"ms_per_{unit}": b, "max_deviation": deviation[worst], "linear": linear, "verdict": verdict}


def series_linearity(name: str, xs: list[float], points: list[dict], unit: str) -> dict:
    """`linearity` of a series' encode + decode time (`NAME_linearity`), and the verdicts of its
    encode and decode times alone."""
    out = {f"{name}_linearity": linearity(xs, [p["encode_ms"] + p["decode_ms"] for p in points], unit)}
    for part in ("encode", "decode"):
        out[f"{name}_{part}_linearity"] = linearity(xs, [p[f"{part}_ms"] for p in points], unit)["verdict"]
    return out


def memory_growth(points: list[dict]) -> dict:
    """Peak memory against area: the growth per added pixel between the two largest images."""
    small, large = points[-2], points[-1]
    per_pixel = (large["peak_mib"] - small["peak_mib"]) * 2**20 / (large["pixels"] - small["pixels"])
    return {
        "bytes_per_pixel": per_pixel,
        "verdict": (f"from {small['pixels']} to {large['pixels']} pixels the peak grows {per_pixel:.0f} bytes per "
                    f"pixel ({per_pixel / 24:.1f} float64 copies of the 3-channel latents); the output buffers "
                    f"(uint8 image, file) are about 5 bytes per pixel"),
    }


def steps_series(ckpt: Path, image: torch.Tensor, steps=None, budget_s: float = 6.0) -> list[dict]:
    """Encode and decode one 64×64 image with the released network and schedule at T = 1 … 16
    (the weights were trained for T = 4; the rates at other T are not the point, the time is)."""
    base = load_model(ckpt)
    hparams = model_arguments(safe_load(ckpt)["hyper_parameters"])
    rows = []
    for T in steps or STEPS:
        model = build_model(**{**hparams, "n_timesteps": T})
        model.load_state_dict(base.state_dict())
        model.eval()
        compress(model, [image])  # warm-up
        enc_times, dec_times, _, decoded = round_trips(model, image, budget_s, Timers(), Timers())
        rows.append({"T": T, "encode_ms": 1e3 * statistics.median(enc_times),
                     "decode_ms": 1e3 * statistics.median(dec_times), "repeats": len(enc_times),
                     "exact": torch.equal(decoded.image, image)})
    return rows


def run_scaling(section3: dict | None = None, workdir: Path | None = None) -> dict:
    """Section 4: codec time against image area and against T, at section 3's thread count; the
    768×512 point of the area series is section 3's `full` measurement."""
    reason = missing_data()
    if reason:
        return {"skipped": reason}
    section3 = section3 or {}
    start, default_threads = time.perf_counter(), torch.get_num_threads()
    threads = section3.get("threads", default_threads)
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            ckpt = released_checkpoint(Path(tmp))
            area = worker(ckpt, AREA_SIZES, threads)
            steps = steps_series(ckpt, kodak64(1)[0])
    finally:
        torch.set_num_threads(default_threads)
    if "pixels" in section3.get("full", {}):
        area.append(section3["full"])
    keys = ("pixels", "encode_ms", "decode_ms", "ms_per_megapixel", "peak_mib", "coding_share", "repeats", "exact")
    area = [{k: p[k] for k in keys} for p in area]
    mp = [p["pixels"] / 1e6 for p in area]
    ts = [float(r["T"]) for r in steps]
    return {
        "threads": threads,
        "area": area,
        **series_linearity("area", mp, area, "megapixel"),
        "memory": memory_growth(area),
        "steps": steps,
        **series_linearity("steps", ts, steps, "step"),
        "wall_s": time.perf_counter() - start,
        "notes": ("area: centre crops of kodim01 in a fresh process (768x512: section 3's), "
                  "1 timed run each after a 64x64 warm-up; "
                  "steps: one 64x64 image, the released network and schedule at other T, median of up to 3"),
    }


# --- the fresh-process measurement of large images ------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_kib(resettable: bool) -> int:
    return _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_image(module, image: torch.Tensor) -> dict:
    """Encode and decode one image once (instrumented), with its time, bits and peak memory."""
    _trim()
    baseline = _status_kib("VmRSS")
    resettable = _reset_peak()
    enc, dec = Timers(), Timers()
    files, enc_s = enc.call(compress, module, [image])
    enc_peak = _peak_kib(resettable)
    _reset_peak()
    decoded, dec_s = dec.call(decompress, module, files[0])
    dec_peak = _peak_kib(resettable)
    pixels = image.shape[1] * image.shape[2]
    return {
        "height": image.shape[1], "width": image.shape[2], "pixels": pixels, "repeats": 1,
        "encode_ms": 1e3 * enc_s, "decode_ms": 1e3 * dec_s, "ms_per_megapixel": 1e3 * (enc_s + dec_s) / (pixels / 1e6),
        "encode_coding_share": enc.shares()["coding_share"], "decode_coding_share": dec.shares()["coding_share"],
        **merged_shares(enc, dec),
        "exact": torch.equal(decoded.image, image), **file_figures(files, [decoded]),
        "peak_mib": (max(enc_peak, dec_peak) - baseline) / 1024,
        "encode_peak_mib": (enc_peak - baseline) / 1024, "decode_peak_mib": (dec_peak - baseline) / 1024,
        "baseline_mib": baseline / 1024,
        "peak_method": "VmHWM reset by clear_refs minus VmRSS after malloc_trim" if resettable
        else "ru_maxrss (lifetime) minus VmRSS after malloc_trim",
    }


def _worker_main(args: dict) -> None:
    torch.set_num_threads(args["threads"])
    module = load_model(args["ckpt"])
    full = load_image(KODAK / FULL_IMAGE)
    warm = box_resize_center_crop(full, 64)
    decompress(module, compress(module, [warm])[0])
    results = []
    for h, w in args["sizes"]:
        top, left = (full.shape[1] - h) // 2, (full.shape[2] - w) // 2
        results.append(measure_image(module, full[:, top:top + h, left:left + w].contiguous()))
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: bench/codec.py --worker '{\"ckpt\": ..., \"sizes\": [[H, W], ...], \"threads\": N}'"
                 " (make bench runs it)")
