"""The `evaluate` pipeline: UQDM's progressive curves on a set of images (ideal rates, real
`.uqdm` files, distortions per method), the classical codecs on the same images, BD-rates.

Images of any size are cut into the codec's tiles and run with the codec's shared draws (z_1 and
the dithers from the file's seed), so the ideal bits and the pictures are those of the files
written. Image n of a run is coded with seed `seed + n`: its draws are independent of the other
images', as they would be for separately sent files (one z_1 shared by the whole set makes the
set's mean rate at step 1 swing by about ±15% from seed to seed). The chain runs in the model's
dtype; the codec's float64 may round a rare k the other way, which changes nothing measurable.
"""

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from uqdm.codec import randomness
from uqdm.codec.container import parse
from uqdm.codec.tiling import from_tiles, grid, to_tiles
from uqdm.diffusion import UQDM

from .bdrate import bd_rate
from .classical import CODECS, sweep
from .metrics import ProgressiveScores
from .progressive import SharedNoise, point_names, progressive_chain
from .quality import bits_per_pixel, ssim_kind
from .rows import codec_rows, uqdm_rows
from .timed_codec import decode_each, encode_timed

Progress = Callable[[int], None]


def _n_tiles(image: Tensor, tile: int) -> int:
    return math.prod(grid(image.shape[1], image.shape[2], tile))


def _codec_noise(image: Tensor, seed: int, tile: int, n_timesteps: int) -> SharedNoise:
    """The codec's draws for one image's tiles (see `uqdm.codec.randomness`)."""
    shape = (_n_tiles(image, tile), image.shape[0], tile, tile)
    dithers = [randomness.dither(seed, i, shape) for i in range(n_timesteps)]
    return SharedNoise(randomness.top_latent(seed, shape), dithers)


def _groups(images: Sequence[Tensor], tile: int, batch_size: int) -> Iterator[list[tuple[int, Tensor]]]:
    """Consecutive (index, image) pairs holding at least `batch_size` tiles together (the last
    group: the rest)."""
    group, tiles = [], 0
    for n, image in enumerate(images):
        group.append((n, image))
        tiles += _n_tiles(image, tile)
        if tiles >= batch_size:
            yield group
            group, tiles = [], 0
    if group:
        yield group


def _chain_tiles(model, tiles: Tensor, noise: SharedNoise, methods, generator, batch_size: int):
    """`progressive_chain` over tiles in batches of `batch_size`: bits N×P and, per method, the
    pictures P×N×C×tile×tile, on the CPU."""
    bits, pictures = [], {m: [] for m in methods}
    for start in range(0, len(tiles), batch_size):
        rows = slice(start, start + batch_size)
        part = progressive_chain(model, tiles[rows], noise[rows], methods, generator)
        bits.append(part.bits.cpu())
        for m in methods:
            pictures[m].append(torch.stack([p.cpu() for p in part.pictures[m]]))
    return torch.cat(bits), {m: torch.cat(p, dim=1) for m, p in pictures.items()}


def _update_per_image(scores: ProgressiveScores, images: list[Tensor], tile: int, bits: Tensor,
                      pictures: dict[str, Tensor]) -> None:
    """Reassemble each image from its tiles (bits summed, pictures untiled) and feed `scores`, one
    update per run of images of the same size."""
    whole, first = [], 0
    for image in images:
        rows = slice(first, first + _n_tiles(image, tile))
        first = rows.stop
        shown = {m: [from_tiles(p[rows], *image.shape[1:]) for p in pics] for m, pics in pictures.items()}
        whole.append((image, bits[rows].sum(0), shown))
    for _, same in itertools.groupby(whole, key=lambda item: item[0].shape):
        images_, bits_, shown_ = zip(*same)
        stacked = {m: [torch.stack(p) for p in zip(*(s[m] for s in shown_))] for m in scores.methods}
        scores.update(torch.stack(images_), torch.stack(bits_), stacked)


def run_chain(model: UQDM, images: Sequence[Tensor], scores: ProgressiveScores, *, seed: int = 0,
              tile: int = 64, batch_size: int = 32, progress: Progress | None = None) -> None:
    """The progressive chain on every image's tiles, with the codec's draws for seed `seed + n`
    (image n), in batches of about `batch_size` tiles; feeds `scores`."""
    T = model.n_timesteps
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)  # ancestral sampling
    for batch in _groups(images, tile, batch_size):
        tiles = torch.cat([to_tiles(image, tile) for _, image in batch])
        noise = SharedNoise.cat([_codec_noise(image, seed + n, tile, T) for n, image in batch])
        bits, pictures = _chain_tiles(model, tiles, noise, scores.methods, generator, batch_size)
        _update_per_image(scores, [image for _, image in batch], tile, bits, pictures)
        if progress is not None:
            progress(len(batch))


def compress_each(module: nn.Module, images: Sequence[Tensor], *, seed: int = 0, tile: int = 64,
                  progress: Progress | None = None) -> tuple[list[bytes], list[list[float]], list[list[float]]]:
    """Each image's `.uqdm` file (seed `seed + n` for image n) and, per image and truncation point,
    the real cumulative bits per pixel (the file's bytes up to the end of that point's chunk, all its
    layers, header included) and the encoding time (`timed_codec.encode_timed`)."""
    files, file_bpp, times = [], [], []
    for n, image in enumerate(images):
        data, seconds = encode_timed(module, image, seed=seed + n, tile=tile)
        container = parse(data)
        steps = range(container.header.n_timesteps + 2)
        file_bpp.append([bits_per_pixel(8 * container.ends[container.header.records_after(k)], image) for k in steps])
        files.append(data)
        times.append(seconds)
        if progress is not None:
            progress(1)
    return files, file_bpp, times


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
    batch_size: int = 32,
    size: int | None = None,
    decode: bool = True,
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
    decoding time: the denoise decoder's, None without `decode`); `per_image` holds one row per
    image, curve and point (`rows`), images named by `names` (default: their index).
    `lpips` (`perceptual.load_lpips`) and `inception` (`fid.load_inception`) add LPIPS and FID.
    `decode` decodes every file again, timed, and warns about any that is not its image; its denoise
    pictures after every layer give `layer_points` and `bd_rate_layers` (None and {} without it).
    `progress(description, total, unit)` makes a progress callback (called with the units done).
    """
    names = [str(n) for n in range(len(images))] if names is None else list(names)
    points_named = point_names(module.model.n_timesteps)
    kind = ssim_kind(images)
    device = next(module.parameters()).device
    scores = ProgressiveScores(len(points_named), methods, ssim=kind, inception=inception, lpips=lpips,
                               per_image=True).to(device)
    times = {}
    start = time.perf_counter()
    run_chain(module.model.eval(), images, scores, seed=seed, tile=tile, batch_size=batch_size,
              progress=progress("UQDM chain", len(images), "image") if progress else None)
    s = scores.compute()
    times["uqdm_chain"] = time.perf_counter() - start
    start = time.perf_counter()
    bar = progress("UQDM files", len(images), "image") if progress else None
    files, file_bpp, encoding_time = compress_each(module, images, seed=seed, tile=tile, progress=bar)
    times["uqdm_files"] = time.perf_counter() - start
    warnings, decoding_time, layers = [], None, None
    if decode:
        start = time.perf_counter()
        decoding_time, layer_psnr, warnings = decode_each(
            module, files, images, progress("UQDM decoding", len(images), "image") if progress else None)
        times["uqdm_decoding"] = time.perf_counter() - start
        layers = layer_points(files, images, layer_psnr)
    mean = lambda per_image, j: float(np.mean([values[j] for values in per_image]))
    points = [
        {
            "point": j,
            "name": name,
            "bpp_ideal": s["bpp"][j],
            "bpp_file": mean(file_bpp, j),
            "psnr": {m: s["psnr"][m][j] for m in methods},
            "ssim": {m: s["ssim"][m][j] for m in methods},
            "lpips": {m: s["lpips"][m][j] for m in methods} if s["lpips"] else None,
            "fid": {m: s["fid"][m][j] for m in methods} if s["fid"] else None,
            "encoding_time": mean(encoding_time, j),
            "decoding_time": mean(decoding_time, j) if decode else None,
        }
        for j, name in enumerate(points_named)
    ]
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
