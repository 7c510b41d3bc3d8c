"""Fuzzing the decoder: mutations of a real `.uqdm` file, and the oracle that judges what the
decoder makes of each.

Shared by `tests/test_fuzz_decoder.py` (hypothesis, a bounded sample) and `scripts/fuzz_decoder.py`
(the same mutations at scale), which build the same sample file from `tiny_module()`. Every
mutation is a function `(rng, sample) -> bytes` of a `random.Random` and the `Sample` (a small real
file, its chunk boundaries and the picture at every truncation point), so a case is reproducible
from its strategy name and seed.

The decoder may only
- decode: no warning, and the picture is the original file's picture at the same truncation point
  (`decoded` for all T·L + 1 layers, `decoded_prefix` for a prefix ending on a layer boundary);
- decode with the truncation warning, again to the original's picture after the complete layers
  (`decoded_prefix_warned`);
- refuse with a one-line `UQDMError` (`rejected`).
Anything else is a bug: `traceback` (any other exception), `hang` (over the time limit),
`memory` (an allocation that the address-space cap stopped), `silent_wrong_picture`,
`warned_wrong_picture`, `unclear_error` (an empty or multi-line message), `wrongly_rejected` (a
prefix of the original file refused), and for the command line `cli_*` (exit code, stderr or PNG).
"""

import contextlib
import io
import random
import re
import resource
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uqdm.cli import main
from uqdm.codec import compress, decompress, parse
from uqdm.codec.container import DEFAULT_GRID, GRIDS, MAGIC, MODES, VERSION, Header, pack, varint
from uqdm.errors import UQDMError, is_out_of_memory
from uqdm.module import UQDMModule
from uqdm.weights import lightning_checkpoint, save_checkpoint

N_TIMESTEPS = 2
IMAGE_SIZE = (4, 7)  # H, W: with TILE = 4, two tiles, the second one padded
TILE = 4
SEED = 3
TIME_LIMIT = 5.0  # seconds per decode before it counts as a hang
MEMORY_HEADROOM = 1 << 30  # address space a decode may add (the tiny file needs a few MB)

OK = ("decoded", "decoded_prefix", "decoded_prefix_warned", "rejected")
TRUNCATION_WARNING = re.compile(r"the \.uqdm file ends inside (layer \d+ of step \d+|the lossless chunk); "
                                r"decoding its \d+ complete layers")


# --- the real file --------------------------------------------------------------------------
TINY = {"embedding_dim": 8, "norm_groups": 4, "n_timesteps": N_TIMESTEPS}  # one residual block a level


def tiny_module(seed: int = 0, **hparams) -> UQDMModule:
    """A small random model (`TINY`, updated by `hparams`) with non-trivial tables: built under
    `torch.manual_seed(seed)`, every weight then perturbed by 0.05·N(0, 1) from its (partly zero)
    initialisation, in eval mode."""
    torch.manual_seed(seed)
    module = UQDMModule(**(TINY | hparams))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def sample_image(height: int = IMAGE_SIZE[0], width: int = IMAGE_SIZE[1], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=g) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Sample:
    """A real file: its bytes, header, chunk segments (length ‖ payload ‖ CRC) and its pictures."""

    data: bytes
    header: Header
    ends: tuple[int, ...]  # just past the header, then just past each chunk
    payloads: tuple[bytes, ...]
    refs: tuple[torch.Tensor, ...]  # refs[p]: the picture after p layers, p = 0 … T·L + 1
    image: torch.Tensor

    @property
    def head(self) -> bytes:
        return self.data[: self.ends[0]]

    @property
    def segments(self) -> list[bytes]:
        return [self.data[a:b] for a, b in zip(self.ends, self.ends[1:])]


def make_sample(module: UQDMModule, image: torch.Tensor | None = None, tile: int = TILE, seed: int = SEED) -> Sample:
    image = sample_image() if image is None else image
    data = compress(module.model, [image], tile=tile, seed=seed)[0]
    container = parse(data)
    refs = decompress(module.model, data, all_points=True).points
    assert torch.equal(refs[-1], image)
    return Sample(data, container.header, tuple(container.ends), tuple(container.layers), tuple(refs), image)


def save_module(module: UQDMModule, path: Path) -> Path:
    save_checkpoint(lightning_checkpoint(module.model, module.hparams), path)
    return path


# --- mutations --------------------------------------------------------------------------------
Mutation = Callable[[random.Random, Sample], bytes]


def _randbytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))



def raw_header(fingerprint: bytes, height, width, tile, n_timesteps, layers, seed, lost=0,
               version: int = VERSION) -> bytes:
    """Header bytes (portable mode, the default grid, no CRC) with any field values (ints, or raw
    bytes for a field), bypassing `Header`'s checks."""
    fields = [f if isinstance(f, bytes) else varint(f) for f in (height, width, tile, n_timesteps, layers, seed, lost)]
    return (MAGIC + bytes([version]) + fingerprint + b"".join(fields)
            + bytes([MODES.index("portable"), GRIDS.index(DEFAULT_GRID)]))


def truncation(rng, s):
    """The file cut at a random byte offset."""
    return s.data[: rng.randint(0, len(s.data))]


def boundary_prefix(rng, s):
    """A prefix that ends on a chunk boundary (a valid file)."""
    return s.data[: rng.choice(s.ends)]


def flip_bits(rng, s):
    b = bytearray(s.data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def overwrite(rng, s):
    b, i, n = bytearray(s.data), rng.randrange(len(s.data)), rng.randint(1, 16)
    b[i : i + n] = _randbytes(rng, n)
    return bytes(b)


def insert(rng, s):
    i = rng.randint(0, len(s.data))
    return s.data[:i] + _randbytes(rng, rng.randint(1, 16)) + s.data[i:]


def delete(rng, s):
    i = rng.randrange(len(s.data))
    return s.data[:i] + s.data[i + rng.randint(1, 16) :]


def zero_length(rng, s):
    return b""


def header_only(rng, s):
    return s.head


def damaged_header_only(rng, s):
    """A header-only file with one bit flipped (no chunk, hence no CRC, covers it)."""
    b = bytearray(s.head)
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def other_version(rng, s):
    b = bytearray(s.data)
    b[len(MAGIC)] = rng.choice([v for v in range(256) if v != VERSION])
    return bytes(b)


ABSURD_LENGTHS = (2**31, 2**40, 2**63, 2**70 - 1)
OVERLONG_VARINT = b"\xff" * 10 + b"\x01"  # 11 bytes
ABSURD_FIELDS = {
    "height": (0, 2**20 + 1, 10**6 * 10**6, 2**64),
    "width": (0, 2**20 + 1, 10**12, 2**64),
    "tile": (0, 2**12 + 1, 2**20, 2**40),
    "n_timesteps": (0, 2**12 + 1, 10**9, 2**63),
    "layers": (0, 2**6 + 1, 2**40),
    "seed": (2**64, 2**70 - 1),
    "lost": (32, 2**40),  # bits no known loss has
}


def absurd_size(rng, s):
    """A chunk length, or a header field, set to an absurd value (the rest of the file kept, or
    the chunks dropped so that no CRC stands in the way)."""
    h = s.header
    if rng.random() < 0.4:  # a chunk's length field
        c = rng.randrange(len(s.payloads))
        segs = s.segments
        old = len(varint(len(s.payloads[c])))
        new = rng.choice([*map(varint, ABSURD_LENGTHS), OVERLONG_VARINT])
        segs[c] = new + segs[c][old:]
        return s.head + b"".join(segs[: c + 1] if rng.random() < 0.5 else segs)
    fields = {"height": h.height, "width": h.width, "tile": h.tile, "n_timesteps": h.n_timesteps, "layers": h.layers,
              "seed": h.seed, "lost": 0}
    if rng.random() < 0.15:  # in range one by one, but an absurd padded size: 2^20 tiles of 4096²
        fields.update(height=1, width=2**20, tile=2**12)
    else:
        name = rng.choice(list(ABSURD_FIELDS))
        fields[name] = rng.choice([*ABSURD_FIELDS[name], OVERLONG_VARINT])
    head = raw_header(h.fingerprint, **fields)
    return head + (b"".join(s.segments) if rng.random() < 0.5 else b"")


def garbage(rng, s):
    """Random bytes, bare or after the magic, magic + version, or the real header."""
    prefix = rng.choice([b"", MAGIC, MAGIC + bytes([VERSION]), s.head])
    return prefix + _randbytes(rng, rng.choice([0, 1, 4, 17, rng.randint(0, 2000)]))


def appended(rng, s):
    """A chunk-boundary prefix (or the whole file) followed by random bytes."""
    return s.data[: rng.choice(s.ends)] + _randbytes(rng, rng.randint(1, 64))


def reordered_chunks(rng, s):
    """Whole chunks swapped, duplicated, dropped from the middle, or the file's chunks repeated:
    every chunk keeps its own length and CRC."""
    segs = s.segments
    n = len(segs)
    op = rng.choice(["swap", "duplicate", "drop", "repeat"])
    if op == "swap":
        i, j = rng.sample(range(n), 2)
        segs[i], segs[j] = segs[j], segs[i]
    elif op == "duplicate":
        i = rng.randrange(n)
        segs.insert(rng.randint(0, n), segs[i])
        segs = segs[: rng.randint(1, n)]
    elif op == "drop":
        del segs[rng.randrange(n - 1)]  # not the last one: that would be a valid prefix
    else:
        segs = segs[: rng.randint(1, n - 1)] + segs
    return s.head + b"".join(segs[:n])


def recrc_payload(rng, s):
    """A chunk's payload replaced (random, all ones, shortened, empty, extended) and every CRC
    recomputed: only an exact decoder notices, so any picture is fine, but never a traceback."""
    payloads = list(s.payloads)
    c = rng.randrange(len(payloads))
    kind = rng.choice(["random", "ones", "short", "empty", "extended"])
    if kind == "random":
        payloads[c] = _randbytes(rng, rng.randint(1, 2 * len(payloads[c]) + 8))
    elif kind == "ones":
        payloads[c] = b"\xff" * rng.randint(1, 2 * len(payloads[c]) + 8)
    elif kind == "short":
        payloads[c] = payloads[c][: rng.randrange(max(1, len(payloads[c])))]
    elif kind == "empty":
        payloads[c] = b""
    else:
        payloads[c] += _randbytes(rng, rng.randint(1, 64))
    return pack(s.header, payloads[: rng.randint(c + 1, len(payloads))])


def recrc_header(rng, s):
    """An in-range header field changed and every CRC recomputed (a consistent file of another
    geometry, T or seed holding this file's payloads): any picture is fine, never a traceback."""
    h = s.header
    fields = {"height": h.height, "width": h.width, "tile": h.tile, "n_timesteps": h.n_timesteps, "layers": h.layers,
              "seed": h.seed}
    name = rng.choice(list(fields))
    fields[name] = {
        "height": lambda: rng.randint(1, 24),
        "width": lambda: rng.randint(1, 24),
        "tile": lambda: rng.choice([1, 2, 3, 5, 8, 16]),
        "n_timesteps": lambda: rng.randint(1, 6),
        "layers": lambda: rng.randint(1, 6),
        "seed": lambda: rng.getrandbits(64),
    }[name]()
    header = Header(h.fingerprint, **fields)
    return pack(header, list(s.payloads[: rng.randint(0, min(len(s.payloads), header.n_records))]))


MUTATIONS: dict[str, Mutation] = {
    f.__name__: f
    for f in (truncation, boundary_prefix, flip_bits, overwrite, insert, delete, zero_length, header_only,
              damaged_header_only, other_version, absurd_size, garbage, appended, reordered_chunks,
              recrc_payload, recrc_header)
}
# These defeat the CRCs on purpose: the picture cannot be checked, only that the decoder neither
# crashes nor hangs nor allocates without bound.
NO_PICTURE_ORACLE = frozenset({"recrc_payload", "recrc_header"})


def mutate(strategy: str, seed: int, sample: Sample) -> bytes:
    return MUTATIONS[strategy](random.Random(f"{strategy}/{seed}"), sample)


# --- guards -----------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the watchdog (a BaseException, so that no `except Exception` in the codec eats it)."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Interrupt the block with `Hang` after `seconds` (main thread only; elsewhere just time it).
    An alarm already set (pytest-timeout's, say) is put back, less the time spent here."""
    try:
        previous = signal.signal(signal.SIGALRM, _raise_hang)
    except ValueError:  # not the main thread
        yield
        return
    start = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def _raise_hang(signum, frame):
    raise Hang()


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM):
    """Cap the address space at its current size + `headroom` (soft limit, restored afterwards),
    so that an allocation sized by a corrupt field fails instead of exhausting the machine."""
    current = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if current is None:
        yield
        return
    cap = current + headroom
    for limit in (soft, hard):  # never loosen a cap already in place
        if limit != resource.RLIM_INFINITY:
            cap = min(cap, limit)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/uqdm/" in f.filename] or frames
    f = ours[-1] if ours else None
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" + (f" at {Path(f.filename).name}:{f.lineno} ({f.name})" if f else "")


# --- the oracle -------------------------------------------------------------------------------
@dataclass
class Result:
    outcome: str
    detail: str
    seconds: float

    @property
    def bug(self) -> bool:
        return self.outcome not in OK


def _expected_points(data: bytes) -> int:
    """Complete layers in `data` (as the decoder counts them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(parse(data).layers)


def judge_decoded(sample: Sample, data: bytes, image: torch.Tensor, warned: bool, check_picture: bool) -> tuple[str, str]:
    p = _expected_points(data)
    if check_picture:
        expected = sample.refs[p]
        if image.shape != expected.shape or not torch.equal(image, expected):
            kind = "warned_wrong_picture" if warned else "silent_wrong_picture"
            return kind, f"{tuple(image.shape)} picture differs from the original's after {p} layers"
    if warned:
        return "decoded_prefix_warned", f"{p} layers"
    return ("decoded" if p == len(sample.payloads) else "decoded_prefix"), f"{p} layers"


def classify(module: UQDMModule, sample: Sample, data: bytes, check_picture: bool = True,
             time_limit: float = TIME_LIMIT) -> Result:
    """Decode `data` with the Python API under a watchdog and a memory cap, and judge the outcome."""
    start = time.perf_counter()
    try:
        with memory_cap(), watchdog(time_limit), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoded = decompress(module.model, data)
    except Hang:
        return Result("hang", f"no result after {time_limit} s", time.perf_counter() - start)
    except UQDMError as e:
        seconds = time.perf_counter() - start
        message = str(e)
        if not message.strip() or "\n" in message:
            return Result("unclear_error", repr(message), seconds)
        if sample.data.startswith(data) and data[:4] == MAGIC and len(data) >= sample.ends[0]:
            return Result("wrongly_rejected", f"a prefix of the original file: {message}", seconds)
        return Result("rejected", message, seconds)
    except BaseException as e:  # noqa: BLE001 - everything else is the bug we look for
        if isinstance(e, KeyboardInterrupt):
            raise
        kind = "memory" if is_out_of_memory(e) else "traceback"
        return Result(kind, _where(e), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if seconds > time_limit:
        return Result("hang", f"took {seconds:.1f} s", seconds)
    warned = any(TRUNCATION_WARNING.fullmatch(str(w.message)) for w in caught)
    outcome, detail = judge_decoded(sample, data, decoded.image, warned, check_picture)
    return Result(outcome, detail, seconds)


@dataclass
class CliRun:
    code: int  # exit status (0 when `main` returned)
    stdout: str
    stderr: list[str]
    error: BaseException | None  # anything but SystemExit that escaped `main` (a bug)
    seconds: float


def run_cli(argv: list[str], time_limit: float = TIME_LIMIT) -> CliRun:
    """`uqdm.cli.main(argv)` in-process, with its output captured, a watchdog and a memory cap."""
    out, err, code, error = io.StringIO(), io.StringIO(), 0, None
    start = time.perf_counter()
    try:
        with memory_cap(), watchdog(time_limit), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main(argv)
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    except BaseException as e:  # noqa: BLE001 - Hang, a traceback, an allocation failure
        if isinstance(e, KeyboardInterrupt):
            raise
        error = e
    return CliRun(code, out.getvalue(), err.getvalue().splitlines(), error, time.perf_counter() - start)


def one_line_error(run: CliRun) -> bool:
    """Exit 2 and exactly one non-empty `uqdm: error: ...` line on stderr."""
    return (run.error is None and run.code == 2 and len(run.stderr) == 1
            and run.stderr[0].startswith("uqdm: error: ") and len(run.stderr[0]) > len("uqdm: error: "))


def _cli_bug(run: CliRun) -> Result | None:
    if isinstance(run.error, Hang):
        return Result("hang", "no result within the time limit", run.seconds)
    if run.error is not None:
        return Result("memory" if is_out_of_memory(run.error) else "traceback", _where(run.error), run.seconds)
    if run.code != 0 and not one_line_error(run):
        return Result("cli_bad_failure", f"exit {run.code}, stderr {run.stderr!r}", run.seconds)
    if run.code == 0 and not all(line.startswith("uqdm: warning: ") for line in run.stderr):
        return Result("cli_bad_stderr", repr(run.stderr), run.seconds)
    return None


def classify_cli(ckpt: Path, sample: Sample, data: bytes, workdir: Path, check_picture: bool = True,
                 time_limit: float = TIME_LIMIT) -> Result:
    """Run `uqdm decompress` on `data`: exit 2 with exactly one `uqdm: error:` line, or exit 0
    with a PNG of the right picture and only `uqdm: warning:` lines on stderr."""
    src, out = workdir / "case.uqdm", workdir / "case.png"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    run = run_cli(["decompress", "--ckpt", str(ckpt), str(src), "-o", str(out)], time_limit)
    bug = _cli_bug(run)
    if bug is not None:
        return bug
    if run.code != 0:
        return Result("rejected", run.stderr[0], run.seconds)
    if not out.is_file():
        return Result("cli_no_png", "exit 0 but no PNG", run.seconds)
    with Image.open(out) as png:
        image = torch.from_numpy(np.asarray(png.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    warned = any(TRUNCATION_WARNING.fullmatch(line.removeprefix("uqdm: warning: ")) for line in run.stderr)
    outcome, detail = judge_decoded(sample, data, image, warned, check_picture)
    return Result(outcome, detail, run.seconds)


def classify_cli_tools(data: bytes, workdir: Path, time_limit: float = TIME_LIMIT) -> list[Result]:
    """`uqdm info` and `uqdm truncate --steps 1` on `data` (no model): success or one clear line."""
    src = workdir / "case.uqdm"
    src.write_bytes(data)
    results = []
    for argv in (["info", str(src)], ["truncate", str(src), "--steps", "1", "-o", str(workdir / "cut.uqdm")]):
        run = run_cli(argv, time_limit)
        bug = _cli_bug(run)
        results.append(bug or Result("rejected" if run.code else "decoded", " ".join(argv[:1] + run.stderr), run.seconds))
    return results


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="uqdm-fuzz-") as d:
        yield Path(d)
