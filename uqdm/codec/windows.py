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
from collections.abc import Callable, Iterator, Sequence
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


def window_weight(tile: int, dtype: torch.dtype) -> Tensor:
    """s(p)·s(q) on a t×t window, s(p) = sin²(π(p + ½)/t): ~0 at the window's border."""
    p = torch.arange(tile, dtype=torch.float64)
    s = torch.sin(math.pi * (p + 0.5) / tile) ** 2
    return (s[:, None] * s[None, :]).to(dtype)


Output = tuple[Tensor, Tensor | None]
Place = tuple[int, int, int, tuple[int, int], tuple[int, int]]  # grid, top, left, kept rows, kept columns


class Windowed(nn.Module):
    """A score network run on the windows of `windows`'s module docstring, `batch` windows per call.

    `forward(z, γ_t, i)` takes the base-grid tiles of the images of `arranged`'s layout (in that
    order) at step i and returns the network's outputs in the same order; besides them it holds one
    image's canvas of outputs and `batch` windows at a time.
    `on_windows(done, total)`, when set, is called after every `batch` windows of a pass (one
    `forward`) with the windows run so far in the pass and the pass's total (progress display).
    """

    def __init__(self, network: nn.Module, tile: int, shifted: bool = True, batch: int = 4):
        super().__init__()
        self.network, self.tile, self.shifted, self.batch = network, tile, shifted, max(1, batch)
        self.n_channels = network.n_channels
        self.layout: list[tuple[int, int]] = []
        self.blend = False
        self.on_windows: Callable[[int, int], None] | None = None

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

    def _offsets(self, step: int, rows: int, cols: int) -> list[Offset]:
        if self.blend:
            return blend_offsets(rows, cols, self.tile)
        return [step_offset(step, rows, cols, self.tile) if self.shifted else (0, 0)]

    def _places(self, rows: int, cols: int, step: int) -> list[Place]:
        """The windows of one image of rows×cols tiles at step `step`, grid after grid."""
        t, places = self.tile, []
        for g, (oy, ox) in enumerate(self._offsets(step, rows, cols)):
            ys, xs = _axis(rows * t, t, oy), _axis(cols * t, t, ox)
            places += [(g, y, x, ky, kx) for y, ky in zip(*ys) for x, kx in zip(*xs)]
        return places

    def forward(self, z: Tensor, gamma_t: Tensor, step: int) -> Output:
        t = self.tile
        if sum(r * c for r, c in self.layout) != len(z):
            raise RuntimeError(f"{len(z)} tiles do not match the layout {self.layout}")
        images = [(rows, cols, self._places(rows, cols, step)) for rows, cols in self.layout]
        total, done = sum(len(places) for _, _, places in images), 0

        def ran(n: int) -> None:
            nonlocal done
            done += n
            if self.on_windows is not None:
                self.on_windows(done, total)

        eps, factor, start = torch.empty_like(z), None, 0
        for rows, cols, places in images:
            n = rows * cols
            canvas = from_tiles(z[start : start + n], rows * t, cols * t)
            out_eps, out_factor = self._outputs(canvas, places, gamma_t, ran)
            eps[start : start + n] = to_tiles(out_eps, t)
            if out_factor is not None:
                factor = torch.empty_like(z) if factor is None else factor
                factor[start : start + n] = to_tiles(out_factor, t)
            start += n
        return eps, factor

    def _outputs(self, canvas: Tensor, places: list[Place], gamma_t: Tensor, ran: Callable[[int], None]) -> Output:
        """The network's outputs on one canvas, its windows `places` `batch` at a time (`ran(n)` after
        each call on n): each pixel's from the window that keeps it (one grid), or blended (several)."""
        t, (_, h, w) = self.tile, canvas.shape
        blended = len({grid for grid, *_ in places}) > 1
        weight = window_weight(t, canvas.dtype).to(canvas.device)
        sums: list[Tensor | None] = [None, None]
        count = canvas.new_zeros(1, h, w) if blended else None
        for first in range(0, len(places), self.batch):
            batch = places[first : first + self.batch]
            windows = torch.stack([canvas[:, y : y + t, x : x + t] for _, y, x, _, _ in batch])
            for n, out in enumerate(self.network(windows, gamma_t)):
                if out is None:
                    continue
                total = sums[n] = canvas.new_zeros(out.shape[1], h, w) if sums[n] is None else sums[n]
                for o, (_, y, x, (y0, y1), (x0, x1)) in zip(out, batch):
                    if blended:
                        total[:, y : y + t, x : x + t] += weight * o
                    else:
                        total[:, y + y0 : y + y1, x + x0 : x + x1] = o[:, y0:y1, x0:x1]
            if blended:
                for _, y, x, _, _ in batch:
                    count[:, y : y + t, x : x + t] += weight
            ran(len(batch))
        eps, factor = (part / count if blended and part is not None else part for part in sums)
        return eps, factor
