"""The `.uqdm` byte format: a header and its CRC32, then one chunk per coded step (see docs/format.md).

Parsing checks the header's CRC32 before trusting any of its fields, and every size field against
the bytes actually present before using it. Each chunk's CRC32 binds it to the header and to its
position. A file cut inside a chunk yields its complete chunks and a warning; anything else
malformed is a `UQDMError`.
"""

import warnings
import zlib
from dataclasses import dataclass

from uqdm.errors import UQDMError

MAGIC = b"UQDM"
VERSION = 2  # 2: a CRC32 after the header; chunk CRCs cover the chunk index
FINGERPRINT_BYTES = 8
CRC_BYTES = 4
MAX_VARINT_BYTES = 10
# Inclusive ranges of the header's integer fields.
LIMITS = {
    "height": (1, 1 << 20),
    "width": (1, 1 << 20),
    "tile": (1, 1 << 10),
    "n_timesteps": (1, 1 << 12),
    "seed": (0, (1 << 64) - 1),
}
MAX_PIXELS = 1 << 28  # height·width, and the padded tiles ⌈H/tile⌉·⌈W/tile⌉·tile²


@dataclass(frozen=True)
class Header:
    """What a decoder needs besides the model: geometry, number of steps T and the shared seed."""

    fingerprint: bytes
    height: int
    width: int
    tile: int
    n_timesteps: int
    seed: int

    def __post_init__(self):
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
        """magic ‖ version ‖ fingerprint ‖ varint fields ‖ CRC32 of all of these."""
        fields = (self.height, self.width, self.tile, self.n_timesteps, self.seed)
        head = MAGIC + bytes([VERSION]) + self.fingerprint + b"".join(map(varint, fields))
        return head + _crc(head)

    def as_dict(self) -> dict:
        return {
            "version": VERSION,
            "fingerprint": self.fingerprint.hex(),
            "height": self.height,
            "width": self.width,
            "tile": self.tile,
            "n_timesteps": self.n_timesteps,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Container:
    """A parsed file: its header, the payloads of its complete chunks, and where each ends."""

    header: Header
    chunks: list[bytes]
    ends: list[int]  # byte offset just past the header (ends[0]) and past each chunk
    truncated: bool  # the data ended inside a chunk


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


def chunk_crc(header: bytes, index: int, length: bytes, payload: bytes) -> bytes:
    """CRC32 of header (with its CRC) ‖ index (u32 LE, from 1) ‖ length ‖ payload, little-endian:
    a chunk moved, repeated or following a dropped one fails its check."""
    return _crc(index.to_bytes(4, "little") + length + payload, zlib.crc32(header))


def pack(header: Header, chunks: list[bytes]) -> bytes:
    """Header bytes followed by each chunk as length (varint) ‖ payload ‖ CRC32."""
    head = header.to_bytes()
    if len(chunks) > header.n_timesteps + 1:
        raise ValueError(f"{len(chunks)} chunks for T = {header.n_timesteps} (at most T + 1)")
    parts = [head]
    for index, payload in enumerate(chunks, start=1):
        length = varint(len(payload))
        parts += [length, payload, chunk_crc(head, index, length, payload)]
    return b"".join(parts)


def parse_header(data: bytes) -> tuple[Header, int]:
    """The header and the offset just past it (and its CRC32), checked before any field is used."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise UQDMError("not a .uqdm file (bad magic bytes)")
    pos = len(MAGIC)
    if len(data) <= pos:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    if data[pos] != VERSION:
        raise UQDMError(f"unsupported .uqdm format version {data[pos]} (this uqdm reads version {VERSION})")
    fingerprint = data[pos + 1 : pos + 1 + FINGERPRINT_BYTES]
    pos += 1 + FINGERPRINT_BYTES
    values = {}
    for name in LIMITS:
        read = _read_varint(data, pos)
        if read is None:
            raise UQDMError("truncated .uqdm file: it ends inside the header")
        values[name], pos = read
    if len(data) < pos + CRC_BYTES:
        raise UQDMError("truncated .uqdm file: it ends inside the header")
    if data[pos : pos + CRC_BYTES] != _crc(data[:pos]):
        raise UQDMError("corrupt .uqdm file: the header fails its CRC32 check")
    pos += CRC_BYTES
    try:
        return Header(fingerprint, **values), pos
    except ValueError as e:
        raise UQDMError(f"corrupt .uqdm header: {e}") from None


def parse(data: bytes) -> Container:
    """Split a file (or a prefix of one) into header and verified chunks.

    Raises:
        UQDMError: bad magic or version, a header CRC mismatch or field out of range, a chunk CRC
            mismatch (also a chunk out of place), or bytes after
            the T + 1 chunks a file can hold. A file ending inside a chunk only warns.
    """
    header, pos = parse_header(data)
    head = data[:pos]
    chunks, ends = [], [pos]
    while pos < len(data):
        index = len(chunks) + 1
        if index > header.n_timesteps + 1:
            raise UQDMError(f"corrupt .uqdm file: {len(data) - pos} bytes after the last of its {index - 1} chunks")
        read = _read_varint(data, pos)
        if read is None or read[1] + read[0] + CRC_BYTES > len(data):
            warnings.warn(
                f"the .uqdm file ends inside chunk {index}; decoding its {index - 1} complete chunks",
                stacklevel=2,
            )
            return Container(header, chunks, ends, truncated=True)
        length, start = read
        payload, crc = data[start : start + length], data[start + length : start + length + CRC_BYTES]
        if crc != chunk_crc(head, index, data[pos:start], payload):
            raise UQDMError(f"corrupt .uqdm file: chunk {index} fails its CRC32 check")
        chunks.append(payload)
        pos = start + length + CRC_BYTES
        ends.append(pos)
    return Container(header, chunks, ends, truncated=False)


def truncate(data: bytes, n_chunks: int) -> bytes:
    """The prefix of a file that ends after its first `n_chunks` chunks (no model needed)."""
    container = parse(data)
    if not 0 <= n_chunks <= len(container.chunks):
        raise UQDMError(f"cannot keep {n_chunks} chunks: the file holds {len(container.chunks)} complete chunks")
    return data[: container.ends[n_chunks]]
