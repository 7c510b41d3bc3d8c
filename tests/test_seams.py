"""Tile seams: the seam ratio, the network's windows (shifted grids, mirrored edges, blending), and
the released model's pictures on a small Kodak crop."""

import pytest
import torch

from uqdm.codec import compress_progressive
from uqdm.codec.windows import Windowed, blend_offsets, step_offset
from uqdm.evaluation.seams import coding_grids, grid_ratio, seam_ratio
from uqdm.images import load_image
from uqdm.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h // 8, w // 8, generator=g)[None]
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)[0] * 200 + 20


# --- the seam ratio ---------------------------------------------------------------------------

def test_the_seam_ratio_sees_blocks_and_not_smooth_pictures():
    image = smooth(64, 96)
    blocky = image.clone()
    for y in range(0, 64, 16):
        for x in range(0, 96, 16):
            blocky[:, y : y + 16, x : x + 16] += 40.0 * ((y + x) // 16 % 2)
    assert seam_ratio(image, image, 16) == pytest.approx(1.0)
    assert seam_ratio(blocky, image, 16) > 3
    # blocks on the base grid only: the shifted grid does not see them, the worst over both does
    assert seam_ratio(blocky, image, 16, [(8, 8)]) < 1.1
    assert seam_ratio(blocky, image, 16, coding_grids(16)) == seam_ratio(blocky, image, 16)
    assert grid_ratio(image[:, :16, :16], 16) is None  # one tile: no borders


# --- windows ----------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Keeps the windows it is called on; outputs zeros."""

    n_channels = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z, gamma_t):
        self.seen.append(z.clone())
        return torch.zeros_like(z), None


@pytest.mark.parametrize("batch", [1, 4])
def test_shifted_windows_lie_inside_the_canvas_and_straddle_the_tiles(batch):
    """On a 2×3-tile canvas, step 0's windows are the tiles; step 1's are 3×4 windows, every one a
    16×16 block of the canvas (the edge ones at its edges), the inner ones centred on tile corners."""
    recorder = Recorder()
    windowed = Windowed(recorder, 16, shifted=True, batch=batch)
    z = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    canvas = torch.cat([torch.cat(list(z[r * 3 : r * 3 + 3]), dim=2) for r in range(2)], dim=1)  # 3×32×48
    with windowed.arranged([(2, 3)]):
        windowed(z, torch.tensor(-1.0, dtype=torch.float64), 0)
        first = torch.cat(recorder.seen)
        recorder.seen.clear()
        windowed(z, torch.tensor(-1.0, dtype=torch.float64), 1)  # the grid is the step's, whatever γ_t
    assert torch.equal(first, z)
    shifted = torch.cat(recorder.seen)
    assert len(shifted) == 3 * 4 and all(len(w) <= batch for w in recorder.seen)
    tops, lefts = [0, 8, 16], [0, 8, 24, 32]
    for n, window in enumerate(shifted):
        y, x = tops[n // 4], lefts[n % 4]
        assert torch.equal(window, canvas[:, y : y + 16, x : x + 16]), (n, y, x)


def test_the_grid_moves_by_half_a_tile_every_other_step_where_there_are_neighbours():
    assert [step_offset(i, 3, 2, 64) for i in range(3)] == [(0, 0), (32, 32), (0, 0)]
    assert step_offset(1, 1, 4, 64) == (0, 32)  # one row of tiles: shifted along the row only
    assert step_offset(1, 1, 1, 64) == (0, 0)  # one tile: its one window
    assert blend_offsets(2, 2, 16) == [(0, 0), (0, 8), (8, 0), (8, 8)] and blend_offsets(1, 1, 16) == [(0, 0)]


class PixelWise(torch.nn.Module):
    """A network whose outputs at a pixel depend on that pixel only: windows must not change them."""

    n_channels = 3

    def forward(self, z, gamma_t):
        return torch.tanh(z) * 2, z.abs() + 1


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("shifted", [False, True])
def test_windowed_outputs_of_a_pixelwise_network_are_the_networks(shifted, blend):
    """Cropped or blended, the windows' outputs land on the pixels they came from (the blending
    weights sum to one), for every step's grid and several images of different sizes at once."""
    windowed = Windowed(PixelWise(), 16, shifted=shifted, batch=5)
    layout = [(2, 3), (1, 1), (1, 2)]
    z = torch.randn(sum(r * c for r, c in layout), 3, 16, 16, dtype=torch.float64)
    expected = PixelWise()(z, None)
    for step, gamma in enumerate((-1.0, 0.5)):
        with windowed.arranged(layout, blend=blend):
            eps, factor = windowed(z, torch.tensor(gamma, dtype=torch.float64), step)
        assert torch.allclose(eps, expected[0], rtol=0, atol=1e-12)
        assert torch.allclose(factor, expected[1], rtol=0, atol=1e-12)


# --- the released model on a Kodak crop -------------------------------------------------------

def test_pictures_of_a_kodak_crop_show_no_tile_grid(shared_data, released_ckpt):
    """A 128×128 Kodak crop (2×2 tiles): with shifted coding windows and blended pictures, the
    seam ratio is at most 1.1 at every lossy step point of every reconstruction; with the fixed
    grid and unblended pictures (the codec before format version 4), the first points show the
    grid (ratio > 2)."""
    image = load_image(shared_data / "kodak" / "kodim01.png")[:, 192:320, 320:448].contiguous()
    module = load_model(released_ckpt)
    methods = ["denoise", "flow_based", "ancestral"]
    (ours,) = compress_progressive(module, [image], [0], methods, layers=1)
    (plain,) = compress_progressive(module, [image], [0], ["denoise"], layers=1, grid_kind="fixed", blend=False)
    for m in methods:
        ratios = [seam_ratio(p, image, 64, coding_grids(64)) for p in ours.points[m][:-1]]
        assert max(ratios) <= 1.1, (m, ratios)
    before = [seam_ratio(p, image, 64, coding_grids(64)) for p in plain.points["denoise"][:2]]
    assert min(before) > 2, before
