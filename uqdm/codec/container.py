"""The `.uqdm` byte format: a header and its CRC32, then the layers of each coded step's chunk and
the lossless chunk (see docs/format.md).

A file is a sequence of up to T·L + 1 layer records (L quality layers per step, one for the lossless
chunk), each with its own length and CRC32; any prefix ending on a record boundary is a file.
Parsing checks the header's CRC32 before trusting any of its fields, and every size field against
the bytes actually present before using it. Each layer's CRC32 binds it to the header and to its
position. A file cut inside a layer yields its complete layers and a warning; anything else
malformed is a `UQDMError`.
"""

import warnings
import zlib
from dataclasses import dataclass

from uqdm.errors import UQDMError
from uqdm.input_losses import LOSSES, from_bits, to_bits

MAGIC = b"UQDM"
VERSION = 4  # 2: a CRC32 after the header, chunk CRCs cover the chunk index; 3: quality layers, what the input lost,
# network mode; 4: layers refine every symbol's interval, the grid byte (docs/format.md)
FINGERPRINT_BYTES = 8
CRC_BYTES = 4
MAX_VARINT_BYTES = 10
# Inclusive ranges of the header's integer fields.
LIMITS = {
    "height": (1, 1 << 20),
    "width": (1, 1 << 20),
    "tile": (1, 1 << 10),
    "n_timesteps": (1, 1 << 12),
    "layers": (1, 1 << 6),
    "seed": (0, (1 << 64) - 1),
}
MAX_PIXELS = 1 << 28  # height·width, and the padded tiles ⌈H/tile⌉·⌈W/tile⌉·tile²
# How the network runs (docs/format.md): portable (float64, any device, batch and thread count) or
# fast (float32, one tile per call, one thread per call; exact where the network's outputs at z₁
# match the encoder's bit for bit, which the header's check value lets the decoder verify).
MODES = ("portable", "fast")
DEFAULT_MODE = "fast"  # what `compress` writes unless told otherwise
CHECK_BYTES = 4
# Where the network's windows lie at each step (`uqdm.codec.windows`): always on the tiles (fixed),
# or shifted by half a tile on odd steps (shifted; it cost 0.1–0.6% more bits at the same PSNR on
# Kodak crops with the released weights, see README, hence not the default).
GRIDS = ("fixed", "shifted")
DEFAULT_GRID = "fixed"


@dataclass(frozen=True)
class Header:
    """What a decoder needs besides the model: geometry, number of steps T, quality layers L per
    step and the shared seed; and what the picture lacks of the input image it was made from
    (`uqdm.input_losses`, information only)."""

    fingerprint: bytes
    height: int
    width: int
    tile: int
    n_timesteps: int
    layers: int
    seed: int
    lost: tuple[str, ...] = ()
    mode: str = "portable"
    check: bytes = b""  # fast mode: first CHECK_BYTES of SHA-256 of the network's outputs at z₁
    grid: str = DEFAULT_GRID

    def __post_init__(self):
        if not set(self.lost) <= set(LOSSES):
            raise ValueError(f"unknown losses {sorted(set(self.lost) - set(LOSSES))}; known: {list(LOSSES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if len(self.check) != (CHECK_BYTES if self.mode == "fast" else 0):
            raise ValueError(f"a {self.mode} header has a {CHECK_BYTES if self.mode == 'fast' else 0}-byte check value")
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"the fingerprint must be {FINGERPRINT_BYTES} bytes")
        for name, (low, high) in LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} = {getattr(self, name)} is out of range [{low}, {high}]")
        if self.height * self.width > MAX_PIXELS:
            raise ValueError(f"a {self.width}×{self.height} image has more than {MAX_PIXELS} pixels")
        padded = -(-self.height // self.tile) * -(-self.width // self.tile) * self.tile**2
        if padded > MAX_PIXELS:
            raise ValueError(f"a {self.width}×{self.height} image in {self.tile}-pixel tiles pads to "
                             f"{padded} pixels (more than {MAX_PIXELS})")

    def to_bytes(self) -> bytes:
        """magic ‖ version ‖ fingerprint ‖ varint fields ‖ lost (varint bit mask) ‖ mode ‖ check ‖ grid ‖
        CRC32 of all of these."""
        fields = (self.height, self.width, self.tile, self.n_timesteps, self.layers, self.seed, to_bits(self.lost))
        head = MAGIC + bytes([VERSION]) + self.fingerprint + b"".join(map(varint, fields))
        head += bytes([MODES.index(self.mode)]) + self.check + bytes([GRIDS.index(self.grid)])
        return head + _crc(head)

    def as_dict(self) -> dict:
        return {
            "version": VERSION,
            "fingerprint": self.fingerprint.hex(),
            "height": self.height,
            "width": self.width,
            "tile": self.tile,
            "n_timesteps": self.n_timesteps,
            "layers": self.layers,
            "seed": self.seed,
            "lost": list(self.lost),
            "mode": self.mode,
            **({"check": self.check.hex()} if self.check else {}),
            "grid": self.grid,
        }

    @property
    def n_records(self) -> int:
        """Layer records of a whole file: L per step, then the lossless chunk's one."""
        return self.n_timesteps * self.layers + 1

    def records_after(self, steps: int) -> int:
        """Layer records that make up the first `steps` chunks (0 … T + 1)."""
        return min(steps * self.layers, self.n_records)

    def position(self, record: int) -> tuple[int, int]:
        """(step, layer), both from 1, of record `record` (from 1); the lossless chunk is step T + 1."""
        step, layer = divmod(record - 1, self.layers)
        return (step + 1, layer + 1) if step < self.n_timesteps else (self.n_timesteps + 1, 1)

    def describe(self, record: int) -> str:
        """Record `record` in words: `layer 2 of step 3`, or `the lossless chunk`."""
        step, layer = self.position(record)
        return "the lossless chunk" if step > self.n_timesteps else f"layer {layer} of step {step}"


@dataclass(frozen=True)
class Container:
    """A parsed file: its header, the payloads of its complete layer records, and where each ends."""

    header: Header
    layers: list[bytes]  # record n (from 1) is layers[n - 1]; see `Header.position`
    ends: list[int]  # byte offset just past the header (ends[0]) and past each record
    truncated: bool  # the data ended inside a record


def varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low bits first, high bit set on all but the last byte."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, new position), or None when `data` ends first. Raises on over-long encodings."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise UQDMError("corrupt .uqdm file: a length field is longer than 10 bytes")


def _crc(data: bytes, start: int = 0) -> bytes:
    return zlib.crc32(data, start).to_bytes(CRC_BYTES, "little")


def record_crc(header: bytes, index: int, length: bytes, payload: bytes) -> bytes:
    """CRC32 of header (with its CRC) ‖ index (u32 LE, from 1) ‖ length ‖ payload, little-endian:
    a layer moved, repeated or following a dropped one fails its check."""
    return _crc(index.to_bytes(4, "little") + length + payload, zlib.crc32(header))


def pack(header: Header, layers: list[bytes]) -> bytes:
    """Header bytes followed by each layer record as length (varint) ‖ payload ‖ CRC32."""
    head = header.to_bytes()
    if len(layers) > header.n_records:
        raise ValueError(f"{len(layers)} layers for T = {header.n_timesteps}, L = {header.layers} "
                         f"(at most T·L + 1 = {header.n_records})")
    parts = [head]
    for index, payload in enumerate(layers, start=1):
        length = varint(len(payload))
        parts += [length, payload, record_crc(head, index, length, payload)]
    return b"".join(parts)


def parse_header(data: bytes) -> tuple[Header, int]:
    """The header and the offset just past it (and its CRC32), checked before any field is used."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise UQDMError("not a .uqdm file (bad magic bytes)")
    pos = len(MAGIC)
    if len(data) <= pos:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    if data[pos] != VERSION:
        raise UQDMError(f"unsupported .uqdm format version {data[pos]} (this uqdm reads version {VERSION})"
                        + ("; compress the image again" if data[pos] < VERSION else ""))
    fingerprint = data[pos + 1 : pos + 1 + FINGERPRINT_BYTES]
    pos += 1 + FINGERPRINT_BYTES
    values = {}
    for name in [*LIMITS, "lost"]:
        read = _read_varint(data, pos)
        if read is None:
            raise UQDMError("truncated .uqdm file: it ends inside the header")
        values[name], pos = read
    if len(data) <= pos:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    mode, pos = data[pos], pos + 1
    if mode == MODES.index("fast"):
        values["check"], pos = data[pos : pos + CHECK_BYTES], pos + CHECK_BYTES
    if len(data) < pos + 1 + CRC_BYTES:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    grid, pos = data[pos], pos + 1
    if len(data) < pos + CRC_BYTES:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    if data[pos : pos + CRC_BYTES] != _crc(data[:pos]):
        raise UQDMError("corrupt .uqdm file: the header fails its CRC32 check")
    pos += CRC_BYTES
    if mode >= len(MODES):
        raise UQDMError(f"unsupported .uqdm network mode {mode} (this uqdm knows {', '.join(MODES)})")
    if grid >= len(GRIDS):
        raise UQDMError(f"unsupported .uqdm window grid {grid} (this uqdm knows {', '.join(GRIDS)})")
    try:
        values["lost"] = from_bits(values["lost"])
        return Header(fingerprint, **values, mode=MODES[mode], grid=GRIDS[grid]), pos
    except ValueError as e:
        raise UQDMError(f"corrupt .uqdm header: {e}") from None


def parse(data: bytes) -> Container:
    """Split a file (or a prefix of one) into header and verified layer records.

    Raises:
        UQDMError: bad magic or version, a header CRC mismatch or field out of range, a layer CRC
            mismatch (also a layer out of place), or bytes after the T·L + 1 layers a file can
            hold. A file ending inside a layer only warns.
    """
    header, pos = parse_header(data)
    head = data[:pos]
    layers, ends = [], [pos]
    while pos < len(data):
        index = len(layers) + 1
        if index > header.n_records:
            raise UQDMError(f"corrupt .uqdm file: {len(data) - pos} bytes after the last of its {index - 1} layers")
        read = _read_varint(data, pos)
        if read is None or read[1] + read[0] + CRC_BYTES > len(data):
            warnings.warn(
                f"the .uqdm file ends inside {header.describe(index)}; decoding its {index - 1} complete layers",
                stacklevel=2,
            )
            return Container(header, layers, ends, truncated=True)
        length, start = read
        payload, crc = data[start : start + length], data[start + length : start + length + CRC_BYTES]
        if crc != record_crc(head, index, data[pos:start], payload):
            raise UQDMError(f"corrupt .uqdm file: {header.describe(index)} fails its CRC32 check")
        layers.append(payload)
        pos = start + length + CRC_BYTES
        ends.append(pos)
    return Container(header, layers, ends, truncated=False)


def truncate(data: bytes, steps: int | None = None, layers: int | None = None, max_bytes: int | None = None) -> bytes:
    """The prefix of a file (no model needed) that ends after its first `steps` chunks (T + 1: all),
    after its first `layers` layer records, or at the last layer boundary within `max_bytes`."""
    if sum(x is not None for x in (steps, layers, max_bytes)) != 1:
        raise ValueError("give exactly one of steps, layers and max_bytes")
    container = parse(data)
    held = len(container.layers)
    if max_bytes is not None:
        if max_bytes < container.ends[0]:
            raise UQDMError(f"{max_bytes} bytes cannot hold even the {container.ends[0]}-byte header")
        return data[: max(end for end in container.ends if end <= max_bytes)]
    if steps is not None:
        if not 0 <= steps <= container.header.n_timesteps + 1:
            raise UQDMError(f"steps must be between 0 and {container.header.n_timesteps + 1} (T + 1: lossless), "
                            f"got {steps}")
        layers = container.header.records_after(steps)
    if not 0 <= layers <= held:
        raise UQDMError(f"cannot keep {layers} layers: the file holds {held} complete layers")
    return data[: container.ends[layers]]
