"""What the score network sees of a large image: tile-sized windows on a grid that moves from step
to step, and blended windows for the pictures.

The codec holds each image's latents as the tiles of `tiling` (the *base grid*: ⌈H/t⌉×⌈W/t⌉ tiles
of t×t, the image edge-padded to the *canvas*); every symbol, dither and table stays in that
order. Only the network's input changes:

- **Coding** (the prior of each step, at encoder and decoder alike): step i runs the network on
  t×t windows of the grid `step_offset(i)`: the base grid on even steps, the grid shifted by half a
  tile (o = ⌊t/2⌋) on odd ones, along each axis on which the canvas has more than one tile (an
  image of one tile keeps its one window: it has no neighbours to learn from). A shifted window
  straddles the borders of the previous step's tiles, so context crosses every border every second
  step. Every window lies inside the canvas: along a shifted axis the first window sits at 0 and
  its outputs are kept for [0, o) only, the last at the canvas's end, kept for its last t − o
  pixels, and the windows between at o + a·t, kept whole. Each pixel's outputs come from exactly
  one window, which saw z_t of its own t×t neighbourhood, all of it real latents that both sides
  hold before the step is coded.
- **Pictures** (the reconstructions at lossy points): the network's outputs are blended over the
  four grids offset by 0 or ⌊t/2⌋ along each axis (windows of t×t at stride t/2, placed as for
  coding), window w weighted
  at its pixel (p, q) by s(p)·s(q), s(p) = sin²(π(p + ½)/t), and normalised by the sum of the
  weights at each pixel. A window's weight falls to ~0 at its border, so
  the picture has no edges where the windows have theirs.

The network sees t×t windows (64×64 for the released models, its training size) in every case.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .tiling import from_tiles, to_tiles

Offset = tuple[int, int]


def step_offset(step: int, rows: int, cols: int, tile: int) -> Offset:
    """The grid of step `step` (0-based) of a canvas of rows×cols tiles: half a tile along each axis
    with more than one tile on odd steps, else (0, 0)."""
    half = tile // 2 if step % 2 else 0
    return (half if rows > 1 else 0), (half if cols > 1 else 0)


def blend_offsets(rows: int, cols: int, tile: int) -> list[Offset]:
    """The grids blended for pictures: offsets 0 and ⌊t/2⌋ along each axis with more than one tile."""
    ys = [0, tile // 2] if rows > 1 else [0]
    xs = [0, tile // 2] if cols > 1 else [0]
    return [(y, x) for y in ys for x in xs]


def _axis(size: int, tile: int, offset: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Along one axis of the canvas (`size` = n·t): where each window starts, and the part of it
    (lo, hi, within the window) whose outputs are kept. Offset 0: the tiles. Offset o > 0: a window
    at 0 keeping [0, o), windows at o + a·t keeping all of themselves, and one at size − t keeping
    [o, t), so that every window lies inside the canvas and each pixel is kept from one window."""
    n = size // tile
    if offset == 0:
        return [a * tile for a in range(n)], [(0, tile)] * n
    inner = [offset + a * tile for a in range(n - 1)]
    return [0, *inner, size - tile], [(0, offset), *[(0, tile)] * len(inner), (offset, tile)]


def _coordinates(size: int, tile: int, offset: int) -> tuple[Tensor, Tensor]:
    """The canvas coordinate of every window position along an axis, and the window positions kept."""
    starts, kept = _axis(size, tile, offset)
    read = torch.cat([torch.arange(s, s + tile) for s in starts])
    keep = torch.cat([a * tile + torch.arange(lo, hi) for a, (lo, hi) in enumerate(kept)])
    return read, keep


def cut(canvas: Tensor, tile: int, offset: Offset) -> Tensor:
    """C×H×W canvas (H, W multiples of t) → the t×t windows of the grid at `offset`, row-major."""
    _, h, w = canvas.shape
    ys, xs = _coordinates(h, tile, offset[0])[0], _coordinates(w, tile, offset[1])[0]
    return to_tiles(canvas[:, ys][:, :, xs], tile)


def paste(windows: Tensor, height: int, width: int, offset: Offset) -> Tensor:
    """Inverse of `cut`: each pixel of the height×width canvas from the window that keeps it."""
    tile = windows.shape[-1]
    (ys, keep_y), (xs, keep_x) = _coordinates(height, tile, offset[0]), _coordinates(width, tile, offset[1])
    mosaic = from_tiles(windows, len(ys), len(xs))
    return mosaic[:, keep_y][:, :, keep_x]


def blend(windows: Tensor, height: int, width: int, offsets: Sequence[Offset]) -> Tensor:
    """The windows of the grids at `offsets` (in `cut`'s order, one grid after another) weighted by
    `window_weight`, summed on the canvas, divided by the sum of the weights at each pixel."""
    tile = windows.shape[-1]
    weight = window_weight(tile, windows.dtype).to(windows.device)
    total = windows.new_zeros(windows.shape[1], height, width)
    count = windows.new_zeros(1, height, width)
    n = 0
    for oy, ox in offsets:
        for y in _axis(height, tile, oy)[0]:
            for x in _axis(width, tile, ox)[0]:
                total[:, y : y + tile, x : x + tile] += weight * windows[n]
                count[:, y : y + tile, x : x + tile] += weight
                n += 1
    return total / count


def window_weight(tile: int, dtype: torch.dtype) -> Tensor:
    """s(p)·s(q) on a t×t window, s(p) = sin²(π(p + ½)/t): ~0 at the window's border."""
    p = torch.arange(tile, dtype=torch.float64)
    s = torch.sin(math.pi * (p + 0.5) / tile) ** 2
    return (s[:, None] * s[None, :]).to(dtype)


Output = tuple[Tensor, Tensor | None]


class Windowed(nn.Module):
    """A score network run on the windows of `windows`'s module docstring.

    `forward(z, γ_t)` takes the base-grid tiles of the images of `arranged`'s layout (in that order)
    and returns the network's outputs in the same order. The step is recognised by its γ_t
    (`gammas[i]` is step i's: the codec computes them with the same code on both sides).
    """

    def __init__(self, network: nn.Module, tile: int, gammas: Sequence[float], shifted: bool = True):
        super().__init__()
        self.network, self.tile, self.shifted = network, tile, shifted
        self.n_channels = network.n_channels
        self.steps = {g: i for i, g in enumerate(gammas)}
        if len(self.steps) != len(gammas):
            raise ValueError("two steps of the schedule have the same γ_t; the grids cannot tell them apart")
        self.layout: list[tuple[int, int]] = []
        self.blend = False

    @contextmanager
    def arranged(self, layout: Sequence[tuple[int, int]], blend: bool = False) -> Iterator[None]:
        """Within the block, `forward` takes the tiles of images of (rows, cols) tiles each, in
        `layout` order; with `blend`, the outputs are blended over the four grids (pictures)."""
        before = self.layout, self.blend
        self.layout, self.blend = list(layout), blend
        try:
            yield
        finally:
            self.layout, self.blend = before

    def _offsets(self, gamma_t: Tensor, rows: int, cols: int) -> list[Offset]:
        if self.blend:
            return blend_offsets(rows, cols, self.tile)
        step = self.steps.get(float(gamma_t))
        if step is None:
            raise RuntimeError(f"γ_t = {float(gamma_t)} is not one of the model's steps")
        return [step_offset(step, rows, cols, self.tile) if self.shifted else (0, 0)]

    def forward(self, z: Tensor, gamma_t: Tensor) -> Output:
        t = self.tile
        if sum(r * c for r, c in self.layout) != len(z):
            raise RuntimeError(f"{len(z)} tiles do not match the layout {self.layout}")
        canvases, grids, start = [], [], 0
        for rows, cols in self.layout:
            canvas = from_tiles(z[start : start + rows * cols], rows * t, cols * t)
            canvases.append(canvas)
            grids.append(self._offsets(gamma_t, rows, cols))
            start += rows * cols
        windows = torch.cat([cut(c, t, o) for c, offsets in zip(canvases, grids) for o in offsets])
        eps, factor = self.network(windows, gamma_t)
        outs = [self._assemble(o, canvases, grids) for o in (eps, factor) if o is not None]
        return outs[0], (outs[1] if factor is not None else None)

    def _assemble(self, out: Tensor, canvases: list[Tensor], grids: list[list[Offset]]) -> Tensor:
        """The outputs of every window back on each image's canvas, as base-grid tiles."""
        t, start, tiles = self.tile, 0, []
        for canvas, offsets in zip(canvases, grids):
            _, h, w = canvas.shape
            n = sum(len(_axis(h, t, oy)[0]) * len(_axis(w, t, ox)[0]) for oy, ox in offsets)
            part = out[start : start + n]
            start += n
            tiles.append(to_tiles(paste(part, h, w, offsets[0]) if len(offsets) == 1 else blend(part, h, w, offsets), t))
        return torch.cat(tiles)
