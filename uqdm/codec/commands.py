"""The codec's subcommands: import-official, compress, decompress, truncate, info.

Argument parsing and file handling only; `uqdm.cli` turns a `UQDMError` into one line on stderr
and exit code 2. `compress` and `decompress` of several inputs report a bad one in one line and go
on with the others (`uqdm.batch_job`); they read one input at a time, so memory does not grow with
their number, and `decompress` of several files decodes as many at once as torch has threads, each
on one thread (what a file decodes to does not depend on threads). Both draw a progress bar when
stderr is a terminal (`uqdm.progress`). Running out of memory is one line that suggests a smaller ``--batch-tiles``. Each
command imports what it needs when it runs: `truncate` and `info` (without `--ckpt`) read the
container format with the standard library alone, `compress` and `decompress` import torch but not
Lightning.
"""

import argparse
import contextlib
import json
import warnings
from pathlib import Path

from uqdm.atomic import write_atomic
from uqdm.batch_job import BatchJob, warn
from uqdm.errors import UQDMError, is_out_of_memory
from uqdm.input_losses import describe
from uqdm.options import BATCH_TILES, DEFAULT_LAYERS, DEVICES, RECONSTRUCTIONS, RELEASED_WEIGHTS

from .container import DEFAULT_GRID, DEFAULT_MODE, GRIDS, MODES, parse, parse_header, truncate

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
    _batch_tiles(p)
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="fast: float32 network, decodes on machines with the same float32 arithmetic (checked); "
                        "portable: float64 network, decodes anywhere (default: %(default)s)")
    p.add_argument("--grid", choices=GRIDS, default=DEFAULT_GRID,
                   help="shifted: the network's 64×64 windows move by half a tile every other step, across "
                        "the tile borders; fixed: on the tiles at every step (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="refuse an image that the file cannot hold exactly (transparency, more than 8 bits, "
                        "a colour profile, CMYK, several frames) instead of saying what it drops")
    _runtime(p)
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
    _batch_tiles(p)
    _runtime(p)
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


def _batch_tiles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-tiles", type=int, default=BATCH_TILES, metavar="N",
                        help=f"portable mode: tiles per network call (default {BATCH_TILES}); fewer need less "
                             "memory (the fast mode calls it on one tile at a time)")


def _runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the model runs (auto: cuda when available, else cpu; default %(default)s: "
                             "a fast-mode file decodes on the float32 arithmetic it was made with); the shared "
                             "randomness, tables and range coder stay on the CPU")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar (drawn on stderr only when it is a terminal)")


def _model(args):
    """The checkpoint's model on `--device`."""
    import torch

    from uqdm.weights import load_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UQDMError("--device cuda: this machine has no CUDA device that torch can use; "
                        "use --device cpu (or auto)")
    return load_model(args.ckpt).to(device)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UQDMError(f"--{name.replace('_', '-')} must be positive, got {value}")


@contextlib.contextmanager
def _memory_hint(what: str, batch_tiles: int):
    """Turn a failed allocation (host or device) into one line that suggests fewer tiles per call."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UQDMError(f"out of memory {what} with --batch-tiles {batch_tiles} ({reason}); "
                        "try a smaller --batch-tiles") from None


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
def _warnings_to_stderr(prefix: str = ""):
    """Show warnings as `uqdm: warning: <prefix><message>` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        warn(f"{prefix}{message}")


def run_import_official(args) -> None:
    from uqdm.released import import_official
    from uqdm.weights import save_checkpoint

    checkpoint = import_official(args.directory, args.weights)
    save_checkpoint(checkpoint, args.output)
    print(f"{args.output}: {args.weights} weights of {args.directory}")


def _budget_bytes(bpp: float, height: int, width: int) -> int:
    """The bytes R bits per pixel allow an H×W image: ⌊R·H·W/8⌋."""
    if not bpp >= 0:
        raise UQDMError(f"--bpp must be a non-negative number, got {bpp}")
    return int(bpp * height * width // 8)


def run_compress(args) -> None:
    """Images are read one at a time and coded in groups of up to BATCH_TILES_PER_CALL tiles; a group
    that fails is coded again image by image, so that only the bad image fails."""
    _positive(tile=args.tile, batch_tiles=args.batch_tiles)
    if args.bpp is not None:
        _budget_bytes(args.bpp, 1, 1)  # refuse a bad budget before any work
    from uqdm.progress import Progress

    outputs = _destinations(args.images, args, ".uqdm")
    model = _model(args)
    job = BatchJob(len(args.images), "compressed")
    chunks = model.n_timesteps + 1 if args.steps is None else args.steps
    with Progress(len(args.images) * chunks, "compress", args.quiet) as bar:
        group, tiles = [], 0
        for i, path in enumerate(args.images):
            loaded = None
            with job.item(path):
                loaded = _input_image(path, args.strict)
            if loaded is None:
                continue
            n = _tiles(*loaded.image.shape[1:], args.tile)
            if group and tiles + n > BATCH_TILES_PER_CALL:
                _compress_group(model, group, args, outputs, job, bar, chunks)
                group, tiles = [], 0
            group.append((i, loaded))
            tiles += n
        if group:
            _compress_group(model, group, args, outputs, job, bar, chunks)
    job.finish()


def _input_image(path: str, strict: bool):
    """The image, after a warning line (or with --strict, an error) naming what the file cannot hold of it."""
    from uqdm.images import load_image_and_losses

    loaded = load_image_and_losses(path)
    if loaded.lost:
        what = f"{path}: a .uqdm file holds 8-bit RGB: {describe(loaded.lost)}"
        if strict:
            raise UQDMError(f"{what} (refused: --strict)")
        warn(what)
    return loaded


def _tiles(height: int, width: int, tile: int) -> int:
    """Tiles of an H×W image: ⌈H/tile⌉·⌈W/tile⌉."""
    return -(-height // tile) * -(-width // tile)


def _compress_group(model, group: list, args, outputs: list[Path], job: BatchJob, bar, chunks: int) -> None:
    """Code the images of `group` together, `chunks` chunks each, reporting to `bar`."""
    from .codec import compress

    names = ", ".join(args.images[i] for i, _ in group)
    try:
        with bar.task(len(group), chunks) as (on_chunk, on_windows), _memory_hint(f"compressing {names}", args.batch_tiles):
            files = compress(model, [loaded.image for _, loaded in group], steps=args.steps, seed=args.seed,
                             tile=args.tile, batch_tiles=args.batch_tiles, layers=args.layers,
                             lost=[loaded.lost for _, loaded in group], mode=args.mode,
                             on_chunk=on_chunk, on_windows=on_windows, grid_kind=args.grid)
    except UQDMError as error:
        if len(group) == 1:
            return job.fail(error, args.images[group[0][0]])
        for item in group:
            _compress_group(model, [item], args, outputs, job, bar, chunks)
        return
    for (i, loaded), data in zip(group, files):
        with job.item(args.images[i]):
            h, w = loaded.image.shape[1:]
            if args.bpp is not None:
                data = truncate(data, max_bytes=_budget_bytes(args.bpp, h, w))
            write_atomic(outputs[i], data)
            print(f"{args.images[i]} -> {outputs[i]}: {len(data)} bytes, {8 * len(data) / (h * w):.3f} bpp")


def run_decompress(args) -> None:
    """Several files are decoded at once, as many as torch has threads, each on one thread (a
    64×64 file is one tile: the fast mode's threads per tile would leave the other cores idle)."""
    import torch

    from uqdm.images import save_png
    from uqdm.progress import Progress

    from .codec import decompress

    _positive(batch_tiles=args.batch_tiles)
    outputs = _destinations(args.files, args, ".png")
    model = _model(args)
    job = BatchJob(len(args.files), "decompressed")
    chunks = model.n_timesteps + 1 if args.steps is None else args.steps
    threads = torch.get_num_threads()
    workers = min(threads, len(args.files))

    def decode(n: int) -> None:
        path = args.files[n]
        data = _read(path)
        with _torch_threads(1 if workers > 1 else threads, threads), bar.task(1, chunks) as progress, \
                _memory_hint(f"decompressing {path}", args.batch_tiles):
            decoded = decompress(model, data, steps=args.steps, method=args.method,
                                 all_points=args.all_steps is not None, batch_tiles=args.batch_tiles,
                                 on_chunk=progress[0], on_windows=progress[1], ideal=False)
        save_png(decoded.image, outputs[n])
        if args.all_steps is not None:
            for p, picture in enumerate(decoded.points):
                save_png(picture, args.all_steps / f"{Path(path).stem}_{p}.png")

    with Progress(len(args.files) * chunks, "decompress", args.quiet) as bar:
        job.run(args.files, decode, workers)
    job.finish()


@contextlib.contextmanager
def _torch_threads(n: int, after: int):
    """torch's threads on this thread: `n` in the block, `after` from then on."""
    import torch

    torch.get_num_threads()  # sizes a new thread's pool now, before it is set
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(after)


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
            from uqdm.weights import load_model

            from .codec import layer_ideal_bits

            for entry, bits in zip(layers, layer_ideal_bits(load_model(args.ckpt), data)):
                entry["ideal_bits"] = bits
    print(json.dumps({"header": header.as_dict(), "bytes": len(data), "layers": layers}, indent=2))
