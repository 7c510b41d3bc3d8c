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


def uqdm_curves(bpp: list, psnr: dict[str, list]) -> dict[str, tuple[list, list]]:
    """`"UQDM (<method>)" -> (bpp, psnr)` at every truncation point."""
    return {uqdm_label(m): (bpp, values) for m, values in psnr.items()}


def rd_table(names: list[str], scores: dict) -> tuple[list[str], list[list]]:
    """Columns and rows (one per truncation point) of bpp and of PSNR and FID per method, from
    `metrics.ProgressiveScores.compute()`."""
    per_method = [(kind, m, values) for kind in ("psnr", "fid") for m, values in (scores[kind] or {}).items()]
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
    """The printed summary of `results.json`: UQDM per point (FID when measured), then each
    codec's BD-rate."""
    points = results["uqdm"]["points"]
    methods = list(points[0]["psnr"])
    kinds = ["psnr", "fid"] if points[0]["fid"] is not None else ["psnr"]
    columns = ["point", "bpp_ideal", "bpp_file", *(f"{k}/{m}" for k in kinds for m in methods)]
    rows = [[p["name"], p["bpp_ideal"], p["bpp_file"], *(p[k][m] for k in kinds for m in methods)] for p in points]
    text = format_table(columns, rows)
    if results["bd_rate"]:
        rates = ", ".join(f"{CODEC_LABELS.get(c, c)} {'-' if v is None else f'{v:+.1f}%'}"
                          for c, v in results["bd_rate"].items())
        text += f"\nBD-rate of UQDM (denoise, real files) against: {rates}"
    return text


def rd_curves(results: dict) -> dict[str, tuple[list, list]]:
    """Every curve of `results.json` as `label -> (bpp, psnr)`: UQDM per method (real file sizes,
    lossy points), then the classical codecs."""
    points = [p for p in results["uqdm"]["points"] if p["name"] != "lossless"]
    methods = list(points[0]["psnr"])
    curves = uqdm_curves([p["bpp_file"] for p in points], {m: [p["psnr"][m] for p in points] for m in methods})
    for codec, sweep in results["codecs"].items():
        curves[CODEC_LABELS.get(codec, codec)] = ([q["bpp"] for q in sweep], [q["psnr"] for q in sweep])
    return curves


def compressai_files(results: dict) -> dict[str, dict]:
    """`file stem -> {"name", "description", "results": {"bpp", "psnr", "ms-ssim"}}` per curve.

    UQDM: real file sizes at the lossy points. The "ms-ssim" entries hold SSIM where the images are
    too small for MS-SSIM (`results["ssim_metric"]` says which); the description says so too.
    """
    ssim_note = "" if results["ssim_metric"] == "ms-ssim" else "; the ms-ssim entries are SSIM (images under 161 px)"
    size = f" prepared to {results['size']}x{results['size']}" if results["size"] else " at full size"
    images = f"{results['images']} images{size}"
    points = [p for p in results["uqdm"]["points"] if p["name"] != "lossless"]
    out = {}
    for m in points[0]["psnr"]:
        out[f"uqdm-{m}"] = _compressai(
            uqdm_label(m), f"UQDM, {m} reconstructions, real .uqdm file sizes, {images}{ssim_note}",
            [p["bpp_file"] for p in points], [p["psnr"][m] for p in points], [p["ssim"][m] for p in points],
        )
    for codec, sweep in results["codecs"].items():
        knob = results["codec_settings"][codec]
        out[codec] = _compressai(
            CODEC_LABELS.get(codec, codec), f"{CODEC_LABELS.get(codec, codec)}, quality = {knob}, {images}{ssim_note}",
            [q["bpp"] for q in sweep], [q["psnr"] for q in sweep], [q["ssim"] for q in sweep],
        )
    return out


def _compressai(name: str, description: str, bpp: list, psnr: list, ssim: list) -> dict:
    kept = [(b, p, s) for b, p, s in zip(bpp, psnr, ssim) if p is not None and math.isfinite(p)]
    bpp, psnr, ssim = (list(column) for column in zip(*kept)) if kept else ([], [], [])
    return {"name": name, "description": description, "results": {"bpp": bpp, "psnr": psnr, "ms-ssim": ssim}}


def write_outputs(out: Path, results: dict) -> None:
    """`out/results.json`, `out/rd.png` and `out/compressai/<curve>.json`, each written atomically."""
    write_atomic(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    size = f", {results['size']}×{results['size']}" if results["size"] else ""
    title = f"Rate-distortion on {results['images']} images{size} (UQDM: real .uqdm file sizes)"
    write_atomic(out / "rd.png", figure_png(rd_figure(rd_curves(results), title)))
    for stem, curve in compressai_files(results).items():
        write_atomic(out / "compressai" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}.json",
                     (json.dumps(curve, indent=1) + "\n").encode())
