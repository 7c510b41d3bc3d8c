"""How visible a tile grid is in a picture: the seam ratio.

For a grid of `tile`-pixel tiles whose borders lie at rows y ≡ o_y and columns x ≡ o_x (mod tile),
the *border gradient* is the mean of |I(y, x) − I(y − 1, x)| over the rows y on a border and of
|I(y, x) − I(y, x − 1)| over the columns x on a border (all channels; the picture's own edges are
not borders), and the *inside gradient* the same mean over every other pair of neighbours. The
seam ratio of a decoded picture is

    (border / inside of the decoded picture) / (border / inside of the original),

1.0 when the grid is no more visible in the decoded picture than in the original; a blocky
picture scores above 1. `seam_ratio` takes the worst (largest) over the grids it is given.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from uqdm.codec.windows import step_offset


def _border_and_inside(image: Tensor, tile: int, offset: tuple[int, int]) -> tuple[float, float] | None:
    """(mean border gradient, mean inside gradient) of a C×H×W picture, or None without borders."""
    x = image.double()
    border_sum, border_n, inside_sum, inside_n = 0.0, 0, 0.0, 0
    for dim, o in ((1, offset[0]), (2, offset[1])):
        diff = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()
        position = torch.arange(1, x.shape[dim])  # the pair (p − 1, p)
        on_border = (position - o) % tile == 0
        shape = [1, 1, 1]
        shape[dim] = -1
        on_border = on_border.view(shape).expand_as(diff)
        border_sum += diff[on_border].sum().item()
        border_n += int(on_border.sum())
        inside_sum += diff[~on_border].sum().item()
        inside_n += int((~on_border).sum())
    if border_n == 0 or inside_n == 0:
        return None
    return border_sum / border_n, inside_sum / inside_n


def grid_ratio(image: Tensor, tile: int, offset: tuple[int, int] = (0, 0)) -> float | None:
    """border / inside gradient of one picture for one grid (None: no borders, or a flat inside)."""
    means = _border_and_inside(image, tile, offset)
    if means is None or means[1] == 0:
        return None
    return means[0] / means[1]


def seam_ratio(decoded: Tensor, original: Tensor, tile: int,
               offsets: Sequence[tuple[int, int]] = ((0, 0),)) -> float | None:
    """The worst, over the grids at `offsets`, of the decoded picture's border/inside gradient
    ratio divided by the original's (C×H×W pictures of any dtype). None when no grid has a border
    inside the picture (a picture of one tile) or the original is flat."""
    worst = None
    for offset in offsets:
        ours, theirs = grid_ratio(decoded, tile, offset), grid_ratio(original, tile, offset)
        if ours is None or not theirs:
            continue
        worst = max(worst or 0.0, ours / theirs)
    return worst


def coding_grids(tile: int) -> list[tuple[int, int]]:
    """The grids the codec's steps use on an image of several tiles each way: the tiles, and the
    grid shifted by half a tile (`uqdm.codec.windows.step_offset` of an even and an odd step)."""
    return [step_offset(step, 2, 2, tile) for step in (0, 1)]
