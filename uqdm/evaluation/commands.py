"""`uqdm evaluate`: argument parsing, input checks and progress bars (on stderr when it is a terminal
and `--quiet` is not given, as the codec commands' `uqdm.progress.visible`); the work is in `pipeline`."""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from uqdm.atomic import write_atomic
from uqdm.batch_job import warn as print_warning
from uqdm.diffusion import UQDM
from uqdm.errors import UQDMError
from uqdm.images import box_resize_center_crop, load_images
from uqdm.options import DEFAULT_LAYERS, RECONSTRUCTIONS
from uqdm.progress import visible
from uqdm.weights import load_model

from .classical import CODECS
from .fid import fid_protocol, inception_weights, load_inception
from .perceptual import load_lpips
from .pipeline import evaluate
from .quality import LPIPS_MIN_SIDE
from .report import results_table, write_outputs
from .rows import write_csv
from .pretrained import WeightsUnavailable


def _names(allowed: tuple[str, ...], empty: str | None = None):
    """An argparse type: a comma-separated subset of `allowed` (`empty` alone means none)."""

    def parse(text: str) -> list[str]:
        if empty is not None and text == empty:
            return []
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, comma-separated; got {text!r}")
        return list(dict.fromkeys(names))

    return parse


def register(subparsers) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        description="PSNR and SSIM (and optionally LPIPS and FID) at every truncation point of UQDM, ideal and "
        "real-file bits per pixel, encoding and decoding times, the classical codecs on the same images, "
        "and BD-rates. Writes DIR/results.json (means and per-image rows), DIR/rd.png, DIR/compressai/*.json "
        "and the .uqdm files in DIR/files/, and prints a table.",
    )
    p.add_argument("--ckpt", required=True, metavar="C",
                   help="uqdm checkpoint (training's, or from `uqdm import-official`)")
    p.add_argument("--images", required=True, metavar="PATH",
                   help="folder of images, an image, or a .npy of uint8 N×3×H×W / N×H×W×3")
    p.add_argument("--size", type=int, metavar="S",
                   help="box-downsample the short side to S and centre-crop S×S (default: full size, tiled)")
    p.add_argument("--methods", type=_names(RECONSTRUCTIONS), metavar="M[,M...]", default=list(RECONSTRUCTIONS),
                   help=f"reconstructions, comma-separated (default: {','.join(RECONSTRUCTIONS)})")
    p.add_argument("--codecs", type=_names(tuple(CODECS), empty="none"), metavar="C[,C...]", default=list(CODECS),
                   help=f"classical codecs, comma-separated, or none (default: {','.join(CODECS)})")
    p.add_argument("--fid", action="store_true", help="also FID at every lossy point (needs the Inception weights; "
                   "the protocol is written to results.json: FID on a few images compares only with itself)")
    p.add_argument("--fid-weights", metavar="FILE", help="Inception weights file; downloaded there on first use "
                   "(default: the torch.hub cache)")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (AlexNet) at every lossy point, per image "
                   f"(images of at least {LPIPS_MIN_SIDE} px a side; needs torchvision's AlexNet weights)")
    p.add_argument("--lpips-weights", metavar="FILE", help="AlexNet weights file; downloaded there on first use "
                   "(default: the torch.hub cache)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the shared draws: image n is coded with seed N + n (default 0)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="tiles per network call of the codec (default: the codec's, as `uqdm decompress` uses)")
    p.add_argument("--tile", type=int, default=64, metavar="T", help="tile size of the codec (default 64)")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, metavar="L",
                   help=f"quality layers per step of the files (default {DEFAULT_LAYERS}, as `uqdm compress`); "
                   "every layer point is pictured and scored, so 1 (the step points only) is the fastest")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device of the network (default cpu)")
    p.add_argument("--decode-times", action="store_true",
                   help="also decode every file again, timed: decoding times, and a check that each file shows "
                   "the encoder's pictures (by default each image is walked once, with no decoding times)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--csv", metavar="FILE", help="also write the per-image rows as one CSV table")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (drawn on stderr only when it is a terminal)")
    p.set_defaults(run=run)


def _check(args) -> None:
    for name in ("size", "batch_size", "tile", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UQDMError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.seed < 0:
        raise UQDMError(f"--seed must be non-negative, got {args.seed}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as e:
        raise UQDMError(f"--device {args.device} is not usable here: {str(e).splitlines()[0]}") from None


def run(args) -> None:
    """The handler of `uqdm evaluate`."""
    _check(args)
    model = load_model(args.ckpt, map_location=args.device)
    if not isinstance(model, UQDM):
        raise UQDMError(f"{args.ckpt} is a Gaussian diffusion: it has no real code to evaluate")
    named = load_images(args.images)
    images = [box_resize_center_crop(im, args.size) if args.size else im for _, im in named]
    warnings = []

    def warn(message: str) -> None:
        warnings.append(message)
        print_warning(message)

    inception, protocol, lpips = None, None, None
    if args.fid:
        try:
            weights = inception_weights(args.fid_weights)
            inception, protocol = load_inception(weights), fid_protocol(len(images), weights)
        except WeightsUnavailable as e:
            warn(str(e))
    if args.lpips:
        small = min(min(image.shape[-2:]) for image in images)
        if small < LPIPS_MIN_SIDE:
            warn(f"LPIPS is off: the smallest image has a {small} px side, under the {LPIPS_MIN_SIDE} px "
                 "that AlexNet's features need")
        else:
            try:
                lpips = load_lpips(args.lpips_weights)
            except WeightsUnavailable as e:
                warn(str(e))
    bars, shown = [], visible(args.quiet)

    def progress(description: str, total: int, unit: str):
        if bars:
            bars[-1].close()
        bars.append(tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                         disable=not shown))
        return bars[-1].update

    try:
        results, files = evaluate(model, images, names=[name for name, _ in named], methods=args.methods,
                                  codecs=args.codecs, inception=inception, lpips=lpips, seed=args.seed,
                                  tile=args.tile, batch_size=args.batch_size, layers=args.layers, size=args.size,
                                  decode_times=args.decode_times,
                                  progress=progress)
    finally:
        for bar in bars:
            bar.close()
    results["warnings"] = warnings + results["warnings"]
    results["fid_protocol"] = protocol
    out = Path(args.out)
    for (name, _), data in zip(named, files):
        write_atomic(out / "files" / Path(name).with_suffix(".uqdm"), data)
    write_outputs(out, results)
    if args.csv:
        write_csv(args.csv, results["per_image"])
    print(results_table(results))
    for warning in results["warnings"]:
        print(f"warning: {warning}")
    csv = f", {args.csv}" if args.csv else ""
    print(f"wrote {out / 'results.json'}{csv}, {out / 'rd.png'}, {out / 'compressai'}/ "
          f"and {len(files)} files in {out / 'files'}/")
