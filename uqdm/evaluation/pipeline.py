"""The `evaluate` pipeline: UQDM's progressive curves on a set of images (ideal rates, real
`.uqdm` files, distortions per method), the classical codecs on the same images, BD-rates.

Each image's file and its figures come from one walk of the codec's encoder
(`codec.compress_progressive`): the ideal bits are those of the file's chunks and the pictures
are what decoding the file shows, for every method. Image n of a run is coded with seed
`seed + n`: its draws are independent of the other images', as they would be for separately
sent files (one z_1 shared by the whole set makes the set's mean rate at step 1 swing by about
±15% from seed to seed). The network passes per image are those of the paper's evaluation: T for
the walk, plus the remaining steps from each point for `ancestral` and `flow_based`.
"""

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from uqdm.codec.codec import BATCH_TILES
from uqdm.codec.container import parse
from uqdm.options import DEFAULT_LAYERS

from .bdrate import bd_rate
from .classical import CODECS, sweep
from .metrics import ProgressiveScores
from .progressive import point_names
from .quality import bits_per_pixel, psnr_per_image, ssim_kind
from .report import uqdm_points
from .rows import codec_rows, uqdm_rows
from .timed_codec import decode_each, encode_timed

Progress = Callable[[int], None]


def code_each(module: nn.Module, images: Sequence[Tensor], scores: ProgressiveScores, *, seed: int = 0,
              tile: int = 64, batch_tiles: int = BATCH_TILES, layers: int = DEFAULT_LAYERS,
              progress: Progress | None = None
              ) -> tuple[list[bytes], list[list[float]], list[list[float]], list[list[float]] | None]:
    """Each image's lossless `.uqdm` file (seed `seed + n` for image n; `layers` per step), with its
    ideal bits and its decoder's pictures at every step's truncation point for every method of `scores` fed to
    `scores`; returns the files and, per image and truncation point, the real cumulative bits per
    pixel (the file's bytes up to the end of that point's chunk, all its layers, header included)
    and the encoding time (`timed_codec.encode_timed`); and per image the PSNR (dB, inf where
    exact) of its decoder's denoise picture after every layer (None when `scores` has no denoise):
    all from the one walk of the encoder."""
    files, file_bpp, times, layer_psnr = [], [], [], []
    for n, image in enumerate(images):
        encoded, seconds = encode_timed(module, image, seed=seed + n, tile=tile, methods=scores.methods,
                                        batch_tiles=batch_tiles, layers=layers)
        container = parse(encoded.data)
        at = [container.header.records_after(k) for k in range(container.header.n_timesteps + 2)]  # layer points
        bits = torch.tensor(np.cumsum([0.0, *encoded.ideal_bits]))[at]
        scores.update(image[None], bits[None], {m: [encoded.points[m][p][None] for p in at] for m in scores.methods})
        file_bpp.append([bits_per_pixel(8 * container.ends[p], image) for p in at])
        if "denoise" in scores.methods:
            pictures = torch.stack(encoded.points["denoise"])
            layer_psnr.append(psnr_per_image(pictures, image.expand_as(pictures)).tolist())
        files.append(encoded.data)
        times.append(seconds)
        if progress is not None:
            progress(1)
    return files, file_bpp, times, layer_psnr if "denoise" in scores.methods else None


def bd_rates(points: list[dict], codecs: dict[str, list[dict]]) -> dict[str, float | None]:
    """BD-rate (%) of UQDM (denoise, real file sizes, lossy points) against each codec."""
    lossy = points[:-1]
    bpp, psnr = [p["bpp_file"] for p in lossy], [p["psnr"]["denoise"] for p in lossy]
    return {name: bd_rate([q["bpp"] for q in s], [q["psnr"] for q in s], bpp, psnr) for name, s in codecs.items()}


def _as_points(layers: list[dict]) -> list[dict]:
    """Layer points in the shape `bd_rates` reads."""
    return [{"bpp_file": p["bpp_file"], "psnr": {"denoise": p["psnr_denoise"]}} for p in layers]


def layer_points(files: Sequence[bytes], images: Sequence[Tensor], psnr: list[list[float]]) -> list[dict]:
    """`[{"point", "step", "layer", "bpp_file", "psnr_denoise"}]` at every layer boundary (point p:
    the first p layers; the last is the lossless chunk), means over images; PSNR None where a
    picture is exact."""
    bpp = [[bits_per_pixel(8 * end, image) for end in parse(data).ends] for data, image in zip(files, images)]
    header = parse(files[0]).header
    points = [{"point": 0, "step": 0, "layer": 0}] + [
        dict(zip(("point", "step", "layer"), (p, *header.position(p)))) for p in range(1, header.n_records + 1)]
    for j, point in enumerate(points):
        point["bpp_file"] = float(np.mean([b[j] for b in bpp]))
        values = [q[j] for q in psnr]
        point["psnr_denoise"] = float(np.mean(values)) if all(map(math.isfinite, values)) else None
    return points


def run_classical(images: Sequence[Tensor], codecs: Sequence[str], ssim: str, times: dict,
                  progress: Callable[[str, int, str], Progress] | None = None) -> tuple[dict, dict, list[str]]:
    """Each available codec's quality sweep (`classical.sweep`: the points, and the per-image
    figures), its seconds added to `times`, and a warning for each unavailable codec."""
    available = [name for name in codecs if CODECS[name].available()]
    warnings = [f"{name} is not available in this installation; skipped" for name in codecs if name not in available]
    settings = sum(len(CODECS[name].qualities) for name in available)
    bar = progress("classical codecs", settings, "setting") if progress and available else None
    results, per_image = {}, {}
    for name in available:
        start = time.perf_counter()
        results[name], per_image[name] = sweep(CODECS[name], images, ssim, bar)
        times[name] = time.perf_counter() - start
    return results, per_image, warnings


def evaluate(
    module: nn.Module,
    images: Sequence[Tensor],
    *,
    names: Sequence[str] | None = None,
    methods: Sequence[str] = ("denoise",),
    codecs: Sequence[str] = tuple(CODECS),
    inception: nn.Module | None = None,
    lpips: nn.Module | None = None,
    seed: int = 0,
    tile: int = 64,
    batch_size: int | None = None,
    layers: int = DEFAULT_LAYERS,
    size: int | None = None,
    decode_times: bool = False,
    progress: Callable[[str, int, str], Progress] | None = None,
) -> tuple[dict, list[bytes]]:
    """Everything `results.json` holds, and the `.uqdm` files.

    `{"images", "size", "tile", "seed", "ssim_metric", "uqdm": {"nelbo_bpp", "points": [{"point",
    "name", "bpp_ideal", "bpp_file", "psnr": {method: dB}, "ssim": {...}, "lpips": {...} | None,
    "fid": {...} | None, "encoding_time", "decoding_time"}], "layer_points": [{"point", "step", "layer",
    "bpp_file", "psnr_denoise"}] | None}, "codecs": {name: [{"quality", "bpp", "psnr", "ssim",
    "encoding_time", "decoding_time"}]}, "codec_settings": {name: knob}, "bd_rate": {name: %},
    "bd_rate_layers": {name: %},
    "per_image": [row, ...], "warnings": [...], "time_s": {...}}`. Means are over images; bpp are
    cumulative bits per pixel; PSNR is None where every image is exact; `nelbo_bpp` is the NELBO
    on the transmitted latents, i.e. the ideal lossless bpp; times are seconds per image (UQDM's
    decoding time: the denoise decoder's, None without `decode_times`); `per_image` holds one row per
    image, curve and point (`rows`), images named by `names` (default: their index).
    `lpips` (`perceptual.load_lpips`) and `inception` (`fid.load_inception`) add LPIPS and FID.
    `layer_points` and `bd_rate_layers` come from the encoder's walk: its denoise pictures after
    every layer (None and {} without the denoise method). By default each image is walked once;
    `decode_times` decodes every file again, timed, and warns about any that does not show the
    walk's pictures or give back its image.
    `batch_size` is the codec's tiles per network call (default `codec.BATCH_TILES`); `layers` its
    quality layers per step (1: the T + 2 step points only, the least pictures to make).
    `progress(description, total, unit)` makes a progress callback (called with the units done).
    """
    names = [str(n) for n in range(len(images))] if names is None else list(names)
    points_named = point_names(module.n_timesteps)
    kind = ssim_kind(images)
    device = next(module.parameters()).device
    scores = ProgressiveScores(len(points_named), methods, ssim=kind, inception=inception, lpips=lpips,
                               per_image=True).to(device)
    times = {}
    start = time.perf_counter()
    files, file_bpp, encoding_time, layer_psnr = code_each(
        module, images, scores, seed=seed, tile=tile, batch_tiles=batch_size or BATCH_TILES, layers=layers,
        progress=progress("UQDM files", len(images), "image") if progress else None)
    s = scores.compute()
    times["uqdm_files"] = time.perf_counter() - start
    warnings, decoding_time = [], None
    if decode_times:
        start = time.perf_counter()
        decoding_time, warnings = decode_each(
            module, files, images, layer_psnr, progress("UQDM decoding", len(images), "image") if progress else None)
        times["uqdm_decoding"] = time.perf_counter() - start
    layers = layer_points(files, images, layer_psnr) if layer_psnr is not None else None
    mean = lambda per_image, j: float(np.mean([values[j] for values in per_image]))
    points = uqdm_points(points_named, s, bpp_file=[mean(file_bpp, j) for j in range(len(points_named))],
                         encoding_time=[mean(encoding_time, j) for j in range(len(points_named))],
                         decoding_time=[mean(decoding_time, j) for j in range(len(points_named))] if decode_times else None)
    rows = uqdm_rows(names, points_named, scores.per_image, file_bpp, encoding_time, decoding_time, kind)
    classical, classical_per_image, unavailable = run_classical(images, codecs, kind, times, progress)
    warnings += unavailable
    for name, sweep_ in classical.items():
        rows += codec_rows(names, name, [q["quality"] for q in sweep_], classical_per_image[name], kind)
    if classical and "denoise" not in methods:
        warnings.append("no BD-rates: they compare the denoise curve, which was not measured")
    results = {
        "images": len(images),
        "size": size,
        "tile": tile,
        "seed": seed,
        "ssim_metric": kind,
        "uqdm": {"nelbo_bpp": s["bpp"][-1], "points": points, "layer_points": layers},
        "codecs": classical,
        "codec_settings": {name: CODECS[name].knob for name in classical},
        "bd_rate": bd_rates(points, classical) if "denoise" in methods else {},
        "bd_rate_layers": bd_rates(_as_points(layers), classical) if layers else {},
        "per_image": rows,
        "warnings": warnings,
        "time_s": times,
    }
    return results, files
