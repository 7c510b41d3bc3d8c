"""Evaluation outputs: the RD table (printed, or rows for a logger), `results.json`, `rd.png` and
one CompressAI-format file per curve (`python -m compressai.utils.plot` reads them)."""

import json
import math
import re
from pathlib import Path

from uqdm.atomic import write_atomic

from .plots import figure_png, rd_figure

CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF", "jpeg2000": "JPEG 2000", "jxl": "JPEG XL"}


def uqdm_label(method: str) -> str:
    return f"UQDM ({method})"


def codec_label(codec: str) -> str:
    return CODEC_LABELS.get(codec, codec)


def uqdm_curves(bpp: list, psnr: dict[str, list]) -> dict[str, tuple[list, list]]:
    """`"UQDM (<method>)" -> (bpp, psnr)` at every truncation point."""
    return {uqdm_label(m): (bpp, values) for m, values in psnr.items()}


def rd_table(names: list[str], scores: dict) -> tuple[list[str], list[list]]:
    """Columns and rows (one per truncation point) of bpp and of PSNR, LPIPS and FID per method
    (those measured), from `metrics.ProgressiveScores.compute()`."""
    per_method = [(kind, m, values) for kind in ("psnr", "lpips", "fid")
                  for m, values in (scores[kind] or {}).items()]
    columns = ["point", "bpp", *(f"{kind}/{m}" for kind, m, _ in per_method)]
    rows = [[name, scores["bpp"][j], *(values[j] for _, _, values in per_method)] for j, name in enumerate(names)]
    return columns, rows


def format_table(columns: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers with 3 decimals, missing values as "-"."""
    cell = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [columns] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def results_table(results: dict) -> str:
    """The printed summary of `results.json`: UQDM per point (LPIPS and FID when measured), then
    each codec's BD-rate, and what the FID figures compare with."""
    points = results["uqdm"]["points"]
    methods = list(points[0]["psnr"])
    kinds = [kind for kind in ("psnr", "lpips", "fid") if points[0].get(kind) is not None]
    columns = ["point", "bpp_ideal", "bpp_file", *(f"{k}/{m}" for k in kinds for m in methods)]
    rows = [[p["name"], p["bpp_ideal"], p["bpp_file"], *(p[k][m] for k in kinds for m in methods)] for p in points]
    text = format_table(columns, rows)
    if results["bd_rate"]:
        text += f"\nBD-rate of UQDM (denoise, real files) against: {_rates(results['bd_rate'])}"
    if results.get("bd_rate_layers"):
        text += f"\nBD-rate over every layer point: {_rates(results['bd_rate_layers'])}"
    if results.get("fid_protocol"):
        text += f"\nFID compares {results['fid_protocol']['comparable']} (fid_protocol in results.json)"
    return text


def _rates(bd_rates: dict) -> str:
    """`JPEG -16.6%, WebP +55.0%, …` (`-` where a BD-rate is undefined)."""
    return ", ".join(f"{codec_label(c)} {'-' if v is None else f'{v:+.1f}%'}" for c, v in bd_rates.items())


def rd_curves(results: dict) -> dict[str, tuple[list, list]]:
    """Every curve of `results.json` as `label -> (bpp, psnr)`: UQDM per method (real file sizes,
    lossy points; ideal bits where a run wrote no files), UQDM's layer points (denoise, when
    measured), then the classical codecs (if any)."""
    points = [p for p in results["uqdm"]["points"] if p["name"] != "lossless"]
    methods = list(points[0]["psnr"])
    bpp = [p["bpp_file"] if p.get("bpp_file") is not None else p["bpp_ideal"] for p in points]
    curves = uqdm_curves(bpp, {m: [p["psnr"][m] for p in points] for m in methods})
    layers = [p for p in results["uqdm"].get("layer_points") or [] if p["psnr_denoise"] is not None]
    if layers:
        curves[f"{uqdm_label('denoise')}, every layer"] = ([p["bpp_file"] for p in layers],
                                                          [p["psnr_denoise"] for p in layers])
    for codec, sweep in results.get("codecs", {}).items():
        curves[codec_label(codec)] = ([q["bpp"] for q in sweep], [q["psnr"] for q in sweep])
    return curves


def compressai_files(results: dict) -> dict[str, dict]:
    """`file stem -> {"name", "description", "results": {...}}` per curve, in the layout of
    CompressAI's result files (`compressai.utils.eval_model`, `results/image/kodak/*.json`).

    `results` holds `bpp`, `psnr-rgb` and, under its own name, the run's SSIM: `ms-ssim-rgb`
    (CompressAI's plot converts it to dB) or `ssim-rgb` for images under 161 px, which have no
    MS-SSIM; then `encoding_time` and `decoding_time` (seconds per image, where measured). The keys
    of CompressAI before 1.2.5 are there too: `psnr`, and `ms-ssim` when it is MS-SSIM. UQDM:
    real file sizes at the lossy points.
    """
    kind = results["ssim_metric"]
    size = f" prepared to {results['size']}x{results['size']}" if results["size"] else " at full size"
    images = f"{results['images']} images{size}"
    points = [p for p in results["uqdm"]["points"] if p["name"] != "lossless"]
    out = {}
    for m in points[0]["psnr"]:
        out[f"uqdm-{m}"] = _compressai(
            uqdm_label(m), f"UQDM, {m} reconstructions, real .uqdm file sizes, {images}", kind,
            [{"bpp": p["bpp_file"], "psnr": p["psnr"][m], "ssim": p["ssim"][m], "encoding_time": p["encoding_time"],
              "decoding_time": p["decoding_time"] if m == "denoise" else None} for p in points],  # denoise decoder
        )
    for codec, sweep in results["codecs"].items():
        knob = results["codec_settings"][codec]
        out[codec] = _compressai(
            codec_label(codec), f"{codec_label(codec)}, quality = {knob}, {images}", kind, sweep)
    return out


def _compressai(name: str, description: str, kind: str, points: list[dict]) -> dict:
    """One CompressAI file from points `{"bpp", "psnr", "ssim", "encoding_time", "decoding_time"}`
    (points without a finite PSNR left out; a time key only where every point has it)."""
    kept = [p for p in points if p["psnr"] is not None and math.isfinite(p["psnr"])]
    column = lambda key: [p[key] for p in kept]
    psnr, ssim = column("psnr"), column("ssim")
    results = {"bpp": column("bpp"), "psnr-rgb": psnr, f"{kind}-rgb": ssim, "psnr": psnr}
    if kind == "ms-ssim":
        results["ms-ssim"] = ssim
    for key in ("encoding_time", "decoding_time"):
        if kept and all(p.get(key) is not None for p in kept):
            results[key] = column(key)
    return {"name": name, "description": description, "results": results}


def uqdm_points(names: list[str], scores: dict, bpp_file: list | None = None, encoding_time: list | None = None,
                decoding_time: list | None = None) -> list[dict]:
    """The `uqdm.points` records of `results.json`, one per truncation point, from
    `metrics.ProgressiveScores.compute()`: `{"point", "name", "bpp_ideal", "bpp_file", "psnr":
    {method: dB}, "ssim" / "lpips" / "fid": {...} | None, "encoding_time", "decoding_time"}`;
    the per-point lists left out (a fit run writes no files) are None."""
    at = lambda values, j: values[j] if values is not None else None
    per_method = lambda kind, j: {m: v[j] for m, v in scores[kind].items()} if scores.get(kind) else None
    return [
        {
            "point": j,
            "name": name,
            "bpp_ideal": scores["bpp"][j],
            "bpp_file": at(bpp_file, j),
            "psnr": per_method("psnr", j),
            "ssim": per_method("ssim", j),
            "lpips": per_method("lpips", j),
            "fid": per_method("fid", j),
            "encoding_time": at(encoding_time, j),
            "decoding_time": at(decoding_time, j),
        }
        for j, name in enumerate(names)
    ]


def fit_results(names: list[str], scores: dict, images: int, size: int | None, global_step: int) -> dict:
    """A fit run's `rd.json`: `results.json`'s layout (see `pipeline.evaluate`) with ideal bits only
    (no files, codecs or BD-rates), from the progressive metrics of its last validation."""
    return {
        "images": images,
        "size": size,
        "ssim_metric": None,
        "uqdm": {"nelbo_bpp": scores["bpp"][-1], "points": uqdm_points(names, scores)},
        "codecs": {},
        "codec_settings": {},
        "bd_rate": {},
        "warnings": [],
        "global_step": global_step,
    }


def write_json(path: str | Path, data: dict) -> None:
    """`data` as indented JSON, atomically: how `results.json`, the CompressAI files and each fit
    run's `rd.json` are written (`uqdm plot` reads them all)."""
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def write_outputs(out: Path, results: dict) -> None:
    """`out/results.json`, `out/rd.png` and `out/compressai/<curve>.json`, each written atomically."""
    write_json(out / "results.json", results)
    size = f", {results['size']}×{results['size']}" if results["size"] else ""
    title = f"Rate-distortion on {results['images']} images{size} (UQDM: real .uqdm file sizes)"
    write_atomic(out / "rd.png", figure_png(rd_figure(rd_curves(results), title)))
    for stem, curve in compressai_files(results).items():
        write_json(out / "compressai" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}.json", curve)
