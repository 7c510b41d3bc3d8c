"""Cutting an image into the model's tile size and putting it back together.

An H×W image is edge-padded (last row and column repeated) to multiples of the tile size and cut
into tiles in row-major order; decoding reassembles the tiles and crops the padding away.
"""

import torch
from torch import Tensor


def grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Tiles per column and per row: (⌈H/tile⌉, ⌈W/tile⌉)."""
    return -(-height // tile), -(-width // tile)


def to_tiles(image: Tensor, tile: int) -> Tensor:
    """C×H×W → N×C×tile×tile, N = ⌈H/tile⌉·⌈W/tile⌉, edge-padded, row-major (any dtype)."""
    c, h, w = image.shape
    rows, cols = grid(h, w, tile)
    ys = torch.arange(rows * tile).clamp(max=h - 1)
    xs = torch.arange(cols * tile).clamp(max=w - 1)
    padded = image[:, ys][:, :, xs]
    tiles = padded.reshape(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, c, tile, tile).contiguous()


def from_tiles(tiles: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `to_tiles`: N×C×tile×tile → C×height×width (the padding cropped away)."""
    n, c, tile, _ = tiles.shape
    rows, cols = grid(height, width, tile)
    if n != rows * cols:
        raise ValueError(f"{n} tiles do not make a {width}×{height} image of {tile}-pixel tiles")
    image = tiles.reshape(rows, cols, c, tile, tile).permute(2, 0, 3, 1, 4)
    return image.reshape(c, rows * tile, cols * tile)[:, :height, :width].contiguous()
