"""`uqdm plot`: the rate-distortion curves of several runs in one figure, with BD-rates against an
anchor curve. Reads `results.json` of `uqdm evaluate`, a fit run's `rd.json` and CompressAI result
files (its own `compressai/*.json`, or the files CompressAI publishes). Imports neither torch nor
Lightning."""

import argparse
import json
import math
from pathlib import Path

from uqdm.atomic import write_atomic
from uqdm.errors import UQDMError

from .bdrate import bd_rate
from .plots import figure_png, rd_figure
from .report import format_table, rd_curves, uqdm_curves

Curves = dict[str, tuple[list, list]]  # label -> (bpp, PSNR)


def read_curves(path: str | Path) -> Curves:
    """The PSNR curves of one file, by label.

    - `results.json` (`{"uqdm": {"points": [...]}, "codecs": ...}`, also a fit run's `rd.json` in
      that layout): UQDM per method at the lossy points, then each classical codec;
    - a progressive-metrics summary `{"bpp": [per point], "psnr": {method: [per point]}}`;
    - a CompressAI file `{"name", "results": {"bpp", "psnr-rgb" or "psnr"}}`: one curve, named by
      its "name" (else the file's stem).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UQDMError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UQDMError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise UQDMError(f"{path}: not a results file (a JSON object was expected)")
    try:
        if isinstance(data.get("uqdm"), dict):
            return rd_curves(data)
        if isinstance(data.get("psnr"), dict) and isinstance(data.get("bpp"), list):
            return uqdm_curves(data["bpp"][:-1], {m: v[:-1] for m, v in data["psnr"].items()})
        results = data.get("results", data)
        if isinstance(results, dict) and "bpp" in results:
            key = next((k for k in ("psnr-rgb", "psnr") if k in results), None)
            if key is None:
                raise UQDMError(f"{path}: no PSNR (psnr-rgb or psnr) among {', '.join(results)}")
            return {str(data.get("name", path.name.split(".")[0])): (results["bpp"], results[key])}
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise UQDMError(f"{path}: malformed results file ({type(e).__name__}: {e})") from None
    raise UQDMError(f"{path}: neither uqdm's results.json / rd.json nor a CompressAI result file")


def _run_name(path: Path) -> str:
    """What tells a file's curves apart from another file's: the folder of a results.json or
    rd.json, else the file's stem."""
    if path.name in ("results.json", "rd.json"):
        return path.resolve().parent.name
    return path.stem


def overlay(paths: list[str | Path]) -> Curves:
    """Every curve of every file; labels that two files share get the run's name appended."""
    per_file = [(Path(p), read_curves(p)) for p in paths]
    counts: dict[str, int] = {}
    for _, curves in per_file:
        for label in curves:
            counts[label] = counts.get(label, 0) + 1
    merged: Curves = {}
    for path, curves in per_file:
        for label, curve in curves.items():
            name = f"{label} [{_run_name(path)}]" if counts[label] > 1 else label
            while name in merged:  # the same run name twice
                name += "'"
            merged[name] = curve
    return merged


def bd_rate_table(curves: Curves, anchor: str) -> str:
    """Each curve's number of points and BD-rate (%) against `anchor` ("-" where the PSNR ranges
    do not overlap)."""
    a_bpp, a_psnr = curves[anchor]
    rows = []
    for label, (bpp, psnr) in curves.items():
        rate = None if label == anchor else bd_rate(a_bpp, a_psnr, bpp, psnr)
        finite = sum(p is not None and math.isfinite(p) for p in psnr)
        rows.append([label, finite, "anchor" if label == anchor else rate])
    return format_table(["curve", "points", f"BD-rate vs {anchor} (%)"], rows)


def find_anchor(curves: Curves, wanted: str | None) -> str:
    """The anchor's label: `wanted` exactly, else the one label that contains it; default the first."""
    if wanted is None:
        return next(iter(curves))
    if wanted in curves:
        return wanted
    matches = [label for label in curves if wanted.lower() in label.lower()]
    if len(matches) == 1:
        return matches[0]
    raise UQDMError(f"--anchor {wanted!r} {'matches several curves' if matches else 'matches no curve'}; "
                    f"choose one of: {', '.join(matches or curves)}")


def register(subparsers) -> None:
    """Add the `plot` subcommand."""
    p = subparsers.add_parser(
        "plot",
        description="Overlays the PSNR-rate curves of results.json files (uqdm evaluate), fit runs' rd.json "
        "and CompressAI result files (including CompressAI's published ones) in one figure, and prints each "
        "curve's BD-rate against the anchor.")
    p.add_argument("files", nargs="+", metavar="FILE", help="results.json, rd.json or CompressAI .json files")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the figure to write")
    p.add_argument("--anchor", metavar="CURVE", help="the BD-rate anchor: a curve's label, or a part of exactly one "
                   "(default: the first curve)")
    p.add_argument("--title", default="Rate-distortion", help="the figure's title")
    p.set_defaults(run=run)


def run(args) -> None:
    """The handler of `uqdm plot`."""
    curves = overlay(args.files)
    anchor = find_anchor(curves, args.anchor)
    write_atomic(args.output, figure_png(rd_figure(curves, args.title)))
    print(bd_rate_table(curves, anchor))
    print(f"wrote {args.output}")
