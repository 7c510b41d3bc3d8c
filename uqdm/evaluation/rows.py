"""The per-image table of an evaluation: one row per image, curve and point (UQDM: per method and
truncation point; a classical codec: per quality), as `results.json` holds it and `--csv` writes it.

A row's keys, always in `COLUMNS` order: `image` (file name), `codec` ("uqdm" or the codec's
name), `method` and `point` (UQDM) or `quality` (a codec), `bpp` (real file size), `bpp_ideal`
(UQDM: the ideal code length), `psnr` (dB; empty where exact), the SSIM of the run under its own
name (`ssim`, or `ms-ssim` for images of 161 px and more), `lpips` when measured, and the seconds
per image `encoding_time` and `decoding_time` (see `timed_codec`).
"""

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from uqdm.atomic import write_atomic

COLUMNS = ("image", "codec", "method", "point", "quality", "bpp", "bpp_ideal", "psnr", "ssim", "ms-ssim", "lpips",
           "encoding_time", "decoding_time")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def uqdm_rows(names: Sequence[str], points: Sequence[str], per_image: Sequence[dict], file_bpp: Sequence[list],
              encoding_time: Sequence[list], decoding_time: Sequence[list] | None, ssim_kind: str) -> list[dict]:
    """UQDM's rows, image by image, method by method, point by point. `per_image[n]` is
    `metrics.ProgressiveScores.per_image[n]`; the other sequences hold per image one value per
    point. `decoding_time` is that of the denoise decoder: other methods' rows leave it empty."""
    rows = []
    for n, name in enumerate(names):
        figures = per_image[n]
        for m in figures["psnr"]:
            for j, point in enumerate(points):
                row = {"image": name, "codec": "uqdm", "method": m, "point": point, "bpp": file_bpp[n][j],
                       "bpp_ideal": figures["bpp"][j], "psnr": figures["psnr"][m][j]}
                for kind in ("ssim", "lpips"):
                    if kind in figures:
                        row[ssim_kind if kind == "ssim" else kind] = figures[kind][m][j]
                row["encoding_time"] = encoding_time[n][j]
                row["decoding_time"] = decoding_time[n][j] if decoding_time is not None and m == "denoise" else None
                rows.append(row)
    return rows


def codec_rows(names: Sequence[str], codec: str, qualities: Sequence[float], per_image: Sequence[Sequence[dict]],
               ssim_kind: str) -> list[dict]:
    """A classical codec's rows from `classical.sweep`'s per-image figures (per quality, per image)."""
    return [
        {"image": name, "codec": codec, "quality": quality, "bpp": f["bpp"], "psnr": _finite(f["psnr"]),
         ssim_kind: f["ssim"], "encoding_time": f["encoding_time"], "decoding_time": f["decoding_time"]}
        for quality, figures in zip(qualities, per_image)
        for name, f in zip(names, figures)
    ]


def write_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """The rows as one CSV table (atomically): the `COLUMNS` any row has, empty cells for None."""
    present = {key for row in rows for key in row}
    columns = [c for c in COLUMNS if c in present]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_atomic(path, text.getvalue().encode())
