"""What an 8-bit RGB picture, and so a `.uqdm` file, cannot hold of an input image.

Named here once, in the order of their bits in the `.uqdm` header's ``lost`` field (bit 0 first,
docs/format.md); `uqdm.images` finds them, `uqdm compress` reports them, `uqdm info` lists them.
Standard library only (read by `uqdm info`).
"""

LOSSES = {
    "alpha": "transparency composited onto white",
    "depth": "samples of more than 8 bits rounded to 8",
    "profile": "its colour profile dropped",
    "colours": "colours converted to RGB",
    "frames": "frames after the first dropped",
}


def describe(lost) -> str:
    """The losses in words, e.g. "transparency composited onto white, its colour profile dropped"."""
    return ", ".join(LOSSES[name] for name in lost)


def to_bits(lost) -> int:
    """The header's bit mask of the named losses."""
    return sum(1 << i for i, name in enumerate(LOSSES) if name in lost)


def from_bits(bits: int) -> tuple[str, ...]:
    """The names of a header's bit mask (bits without a name raise ValueError)."""
    if bits >> len(LOSSES):
        raise ValueError(f"lost = {bits} has bits beyond the {len(LOSSES)} known losses")
    return tuple(name for i, name in enumerate(LOSSES) if bits >> i & 1)
