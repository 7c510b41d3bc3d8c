"""The codec's subcommands: import-official, compress, decompress, truncate, info.

Argument parsing and file handling only; `uqdm.cli` turns a `UQDMError` into one line on stderr
and exit code 2. Each command imports what it needs when it runs: `truncate` and `info` (without
`--ckpt`) read the container format with the standard library alone, `compress` and `decompress`
import torch but not Lightning.
"""

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

from uqdm.atomic import write_atomic
from uqdm.errors import UQDMError
from uqdm.options import DEFAULT_LAYERS, RECONSTRUCTIONS, RELEASED_WEIGHTS

from .container import parse, parse_header, truncate

BATCH_TILES_PER_CALL = 256  # images are compressed together until they reach this many tiles


def register(subparsers) -> None:
    """Add the codec's subcommands to the `uqdm` tool parser."""
    p = subparsers.add_parser("import-official")
    p.add_argument("directory", help="folder with config.json and checkpoint.pt")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write")
    p.add_argument("--weights", choices=RELEASED_WEIGHTS, default="ema",
                   help="ema: averaged network and schedule (default); raw: raw network, initial schedule")
    p.set_defaults(run=run_import_official)

    p = subparsers.add_parser("compress")
    p.add_argument("--ckpt", required=True, help="model checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, WebP, ... files")
    _outputs(p, "the .uqdm file (one image only)", "write DIR/<image stem>.uqdm")
    p.add_argument("--steps", type=int,
                   help="chunks to code: K ≤ T steps make a lossy file; default T + 1 (lossless)")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                   help=f"quality layers per step: each is a truncation point (default {DEFAULT_LAYERS})")
    p.add_argument("--bpp", type=float, metavar="R",
                   help="write only the layers that fit in R bits per pixel (header included)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared randomness (stored in the file)")
    p.add_argument("--tile", type=int, default=64, help="tile size (default 64, the released models' size)")
    p.set_defaults(run=run_compress)

    p = subparsers.add_parser("decompress")
    p.add_argument("--ckpt", required=True, help="the checkpoint the files were compressed with")
    p.add_argument("files", nargs="+", metavar="FILE")
    _outputs(p, "the PNG (one file only)", "write DIR/<file stem>.png")
    p.add_argument("--steps", type=int, help="decode only the first K chunks")
    p.add_argument("--method", choices=RECONSTRUCTIONS, default="denoise", help="reconstruction of lossy points")
    p.add_argument("--all-steps", metavar="DIR", type=Path,
                   help="also write every truncation point's picture as DIR/<file stem>_<layers>.png "
                   "(after that many layers)")
    p.set_defaults(run=run_decompress)

    p = subparsers.add_parser("truncate")
    p.add_argument("file", metavar="FILE")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, metavar="K", help="whole chunks to keep (T + 1: all)")
    budget.add_argument("--bytes", type=int, metavar="N", help="keep at most N bytes")
    budget.add_argument("--bpp", type=float, metavar="R", help="keep at most R bits per pixel")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(run=run_truncate)

    p = subparsers.add_parser("info", description="Describes a .uqdm file as JSON: every layer's payload bytes and "
                              "the file's bits per pixel up to its end (step T + 1 is the lossless chunk).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--ckpt", help="also report each layer's ideal bits under this model")
    p.set_defaults(run=run_info)


def _outputs(parser: argparse.ArgumentParser, single: str, many: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-o", "--output", type=Path, help=single)
    group.add_argument("--out-dir", type=Path, metavar="DIR", help=many)


def _destinations(inputs: list[str], args, suffix: str) -> list[Path]:
    """-o for a single input, else DIR/<stem><suffix>, refusing two inputs with the same stem."""
    if args.output is not None:
        if len(inputs) != 1:
            raise UQDMError(f"-o takes one input, got {len(inputs)}; use --out-dir")
        return [args.output]
    stems = [Path(p).stem for p in inputs]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise UQDMError(f"two inputs are named {clash!r}; their outputs would overwrite each other")
    return [args.out_dir / f"{s}{suffix}" for s in stems]


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UQDMError(f"cannot read {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def _warnings_to_stderr():
    """Show warnings as `uqdm: warning: <message>` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"uqdm: warning: {message}", file=sys.stderr)


def run_import_official(args) -> None:
    from .official import import_official, save_checkpoint

    checkpoint = import_official(args.directory, args.weights)
    save_checkpoint(checkpoint, args.output)
    print(f"{args.output}: {args.weights} weights of {args.directory}")


def _budget_bytes(bpp: float, height: int, width: int) -> int:
    """The bytes R bits per pixel allow an H×W image: ⌊R·H·W/8⌋."""
    if not bpp >= 0:
        raise UQDMError(f"--bpp must be a non-negative number, got {bpp}")
    return int(bpp * height * width // 8)


def run_compress(args) -> None:
    if args.tile < 1:
        raise UQDMError(f"--tile must be positive, got {args.tile}")
    if args.bpp is not None:
        _budget_bytes(args.bpp, 1, 1)  # refuse a bad budget before any work
    from uqdm.checkpoints import load_module
    from uqdm.images import load_image

    from .codec import compress

    outputs = _destinations(args.images, args, ".uqdm")
    images = [load_image(p) for p in args.images]
    model = load_module(args.ckpt)
    for batch in _batches(images, args.tile):
        files = compress(model, [images[i] for i in batch], steps=args.steps, seed=args.seed, tile=args.tile,
                         layers=args.layers)
        for i, data in zip(batch, files):
            if args.bpp is not None:
                data = truncate(data, max_bytes=_budget_bytes(args.bpp, *images[i].shape[1:]))
            write_atomic(outputs[i], data)
            h, w = images[i].shape[1:]
            print(f"{args.images[i]} -> {outputs[i]}: {len(data)} bytes, {8 * len(data) / (h * w):.3f} bpp")


def _batches(images: list, tile: int) -> list[list[int]]:
    """Indices of images grouped so that each group has at most BATCH_TILES_PER_CALL tiles (or one image)."""
    batches, current, tiles = [], [], 0
    for i, image in enumerate(images):
        n = -(-image.shape[1] // tile) * -(-image.shape[2] // tile)
        if current and tiles + n > BATCH_TILES_PER_CALL:
            batches.append(current)
            current, tiles = [], 0
        current.append(i)
        tiles += n
    return batches + [current]


def run_decompress(args) -> None:
    from uqdm.checkpoints import load_module
    from uqdm.images import save_png

    from .codec import decompress

    outputs = _destinations(args.files, args, ".png")
    model = load_module(args.ckpt)
    for path, output in zip(args.files, outputs):
        data = _read(path)
        with _warnings_to_stderr():
            decoded = decompress(model, data, steps=args.steps, method=args.method,
                                 all_points=args.all_steps is not None)
        save_png(decoded.image, output)
        if args.all_steps is not None:
            for p, picture in enumerate(decoded.points):
                save_png(picture, args.all_steps / f"{Path(path).stem}_{p}.png")


def run_truncate(args) -> None:
    data = _read(args.file)
    with _warnings_to_stderr():
        if args.steps is not None:
            prefix = truncate(data, steps=args.steps)
        elif args.bytes is not None:
            prefix = truncate(data, max_bytes=args.bytes)
        else:
            header, _ = parse_header(data)
            prefix = truncate(data, max_bytes=_budget_bytes(args.bpp, header.height, header.width))
    write_atomic(args.output, prefix)


def run_info(args) -> None:
    data = _read(args.file)
    with _warnings_to_stderr():
        container = parse(data)
        header = container.header
        layers = []
        for n, (payload, end) in enumerate(zip(container.layers, container.ends[1:]), start=1):
            step, layer = header.position(n)
            layers.append({"step": step, "layer": layer, "bytes": len(payload),
                           "bpp": 8 * end / (header.height * header.width)})
        if args.ckpt is not None:
            from uqdm.checkpoints import load_module

            from .codec import layer_ideal_bits

            for entry, bits in zip(layers, layer_ideal_bits(load_module(args.ckpt), data)):
                entry["ideal_bits"] = bits
    print(json.dumps({"header": header.as_dict(), "bytes": len(data), "layers": layers}, indent=2))
