"""Image inputs of `uqdm compress` and of the Python API (`load_image` + `compress`).

Every Pillow mode a user is likely to hand in becomes the RGB picture they would expect (gray as
gray RGB, palette colours, transparency composited onto white, 16-bit scaled to 8 bits) and then
round-trips exactly; 1×1 works; a truncated PNG, a non-image, an empty or missing file and a
decompression bomb are refused in one line (exit 2); and a large image needs memory per pixel, not
the network's activations for all of its tiles at once.
"""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from uqdm.codec import compress, decompress
from uqdm.codec.fuzz import one_line_error, run_cli
from uqdm.errors import UQDMError
from uqdm.images import load_image, load_image_and_losses
from uqdm.input_losses import LOSSES, describe, from_bits, to_bits

TILE = 4
H, W = 5, 6  # two rows and two columns of 4-pixel tiles, the last ones padded

pytestmark = pytest.mark.usefixtures("one_thread")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The expected compositing onto white, from values on a 0..255 scale (float)."""
    a = alpha[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# Each case writes a file and returns the 3×H×W uint8 picture a user expects from it.
def gray(path):
    a = _rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(a, "L").save(path)
    return _tensor(np.repeat(a[..., None], 3, axis=2))


def gray_alpha(path):
    a = _rng(2).integers(0, 256, (H, W, 2), dtype=np.uint8)
    Image.fromarray(a, "LA").save(path)
    return _tensor(np.repeat(_on_white(a[..., :1].astype(float), a[..., 1].astype(float)), 3, axis=2))


def bilevel(path):
    a = _rng(3).integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(a).convert("1").save(path)
    return _tensor(np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=2))


def palette(path):
    rng = _rng(4)
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(colours.flatten().tolist())
    im.save(path)
    return _tensor(colours[index])


def palette_transparent(path):
    rng = _rng(5)
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    alphas = rng.integers(0, 256, 16, dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(colours.flatten().tolist())
    im.info["transparency"] = bytes(alphas)
    im.save(path, transparency=bytes(alphas))
    return _tensor(_on_white(colours[index].astype(float), alphas[index].astype(float)))


def rgb(path):
    a = _rng(6).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").save(path)
    return _tensor(a)


def rgba(path):
    a = _rng(7).integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[0, 0, 3], a[0, 1, 3] = 0, 255  # fully transparent -> white; opaque -> itself
    Image.fromarray(a, "RGBA").save(path)
    return _tensor(_on_white(a[..., :3].astype(float), a[..., 3].astype(float)))


def gray16(path):
    a = _rng(8).integers(0, 65536, (H, W), dtype=np.uint16)
    a[0, :3] = [0, 65535, 32768]
    Image.fromarray(a).save(path)  # mode I;16
    return _tensor(np.repeat(np.rint(a.astype(float) * 255 / 65535).astype(np.uint8)[..., None], 3, axis=2))


def rgb16(path):
    a = _rng(9).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    Path(path).write_bytes(imagecodecs.png_encode(a))  # Pillow reads it as 8-bit RGB, by truncation
    return _tensor(np.rint(a.astype(float) * 255 / 65535))


def rgba16(path):
    a = _rng(10).integers(0, 65536, (H, W, 4), dtype=np.uint16)
    Path(path).write_bytes(imagecodecs.png_encode(a))
    scaled = a.astype(float) * 255 / 65535
    return _tensor(_on_white(scaled[..., :3], scaled[..., 3]))


def one_pixel(path):
    Image.fromarray(np.array([[[12, 200, 77]]], dtype=np.uint8), "RGB").save(path)
    return torch.tensor([12, 200, 77], dtype=torch.uint8).view(3, 1, 1)


def one_pixel_gray16(path):
    Image.fromarray(np.array([[51400]], dtype=np.uint16)).save(path)
    return torch.full((3, 1, 1), round(51400 * 255 / 65535), dtype=torch.uint8)


CASES = [gray, gray_alpha, bilevel, palette, palette_transparent, rgb, rgba, gray16, rgb16, rgba16, one_pixel,
         one_pixel_gray16]
# What each case's 8-bit RGB picture cannot hold of its file (one_pixel_gray16: 51400 = 257·200 is exact).
LOST = {"gray_alpha": ("alpha",), "palette_transparent": ("alpha",), "rgba": ("alpha",), "gray16": ("depth",),
        "rgb16": ("depth",), "rgba16": ("alpha", "depth")}


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_image_modes_become_the_expected_rgb_and_round_trip(case, module, ckpt, tmp_path):
    src = tmp_path / f"{case.__name__}.png"
    expected = case(src)
    # Python API: the expected picture, and an exact round trip through the codec
    loaded = load_image_and_losses(src)
    image = loaded.image
    assert image.dtype == torch.uint8 and image.shape == expected.shape
    assert torch.equal(image, expected) and torch.equal(load_image(src), expected)
    assert loaded.lost == LOST.get(case.__name__, ())
    # the command line: compress, then decompress to the same picture; the file also decodes via the API
    packed, out = tmp_path / "x.uqdm", tmp_path / "x.png"
    run = run_cli(["compress", "--ckpt", str(ckpt), str(src), "-o", str(packed), "--tile", str(TILE)])
    assert run.error is None and run.code == 0, (run.error, run.stderr)
    run = run_cli(["decompress", "--ckpt", str(ckpt), str(packed), "-o", str(out)])
    assert run.error is None and run.code == 0 and not run.stderr, (run.error, run.stderr)
    assert torch.equal(load_image(out), expected)
    assert torch.equal(decompress(module.model, packed.read_bytes()).image, expected)


def test_images_of_every_mode_in_one_call(module, ckpt, tmp_path):
    """Several images of different modes and sizes are compressed together (one tile batch)."""
    sources, expected = [], []
    for case in CASES:
        sources.append(tmp_path / f"{case.__name__}.png")
        expected.append(case(sources[-1]))
    run = run_cli(["compress", "--ckpt", str(ckpt), *map(str, sources), "--out-dir", str(tmp_path / "c"), "--tile", str(TILE)])
    assert run.error is None and run.code == 0, (run.error, run.stderr)
    packed = [tmp_path / "c" / f"{s.stem}.uqdm" for s in sources]
    run = run_cli(["decompress", "--ckpt", str(ckpt), *map(str, packed), "--out-dir", str(tmp_path / "d")])
    assert run.error is None and run.code == 0, (run.error, run.stderr)
    for source, picture in zip(sources, expected):
        assert torch.equal(load_image(tmp_path / "d" / f"{source.stem}.png"), picture), source.stem
    # the same images through the Python API in one call give the same files (what they lost included)
    loaded = [load_image_and_losses(s) for s in sources]
    files = compress(module.model, [x.image for x in loaded], tile=TILE, lost=[x.lost for x in loaded])
    assert files == [p.read_bytes() for p in packed]


# --- what a lossless file cannot hold, named -------------------------------------------------
def _icc(kind: str) -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile(kind)).tobytes()


def opaque_rgba(path):
    a = _rng(12).integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[..., 3] = 255
    Image.fromarray(a, "RGBA").save(path, format="PNG")
    return a[..., :3], ()


def gray16_of_8bit_values(path):
    a = _rng(13).integers(0, 256, (H, W), dtype=np.uint16)
    Image.fromarray(a * 257).save(path, format="PNG")
    return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2), ()


def rgb16_of_8bit_values(path):
    a = _rng(14).integers(0, 256, (H, W, 3), dtype=np.uint16)
    Path(path).write_bytes(imagecodecs.png_encode(a * 257))
    return a.astype(np.uint8), ()


def lab_profile(path):
    a = _rng(15).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").save(path, format="PNG", icc_profile=_icc("LAB"))
    return a, ("profile",)


def srgb_profile(path):
    a = _rng(16).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").save(path, format="PNG", icc_profile=_icc("sRGB"))
    return a, ()


def cmyk(path):
    im = Image.fromarray(_rng(17).integers(0, 256, (H, W, 4), dtype=np.uint8), "CMYK")
    im.save(path, format="TIFF")
    return np.asarray(im.convert("RGB")), ("colours",)


def two_frames(path):
    frames = [Image.fromarray(_rng(18 + i).integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB") for i in range(2)]
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:])
    return np.asarray(frames[0]), ("frames",)


def float_fractions(path):
    a = _rng(20).uniform(-10, 300, (H, W)).astype(np.float32)
    Image.fromarray(a, "F").save(path, format="TIFF")
    rounded = np.rint(np.clip(a.astype(np.float64), 0, 255)).astype(np.uint8)
    return np.repeat(rounded[..., None], 3, axis=2), ("depth",)


def float_integers(path):
    a = _rng(21).integers(0, 256, (H, W)).astype(np.float32)
    Image.fromarray(a, "F").save(path, format="TIFF")
    return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2), ()


LOSS_CASES = [opaque_rgba, gray16_of_8bit_values, rgb16_of_8bit_values, lab_profile, srgb_profile, cmyk, two_frames,
              float_fractions, float_integers]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda f: f.__name__)
def test_what_the_picture_cannot_hold_of_the_file_is_named(case, tmp_path):
    """Only what is really lost is reported: an opaque alpha channel, 16-bit samples that are 8-bit
    values (257·k), float samples that are integers 0…255 and an sRGB profile lose nothing."""
    src = tmp_path / f"{case.__name__}.img"
    pixels, lost = case(src)
    loaded = load_image_and_losses(src)
    assert np.array_equal(loaded.image.permute(1, 2, 0).numpy(), pixels)
    assert loaded.lost == lost
    assert describe(lost) == ", ".join(LOSSES[name] for name in lost)
    assert from_bits(to_bits(lost)) == lost


# --- refused in one line ----------------------------------------------------------------------
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def truncated_png(path):
    Image.fromarray(_rng(11).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "cannot read image"


def png_signature_only(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return "cannot read image"


def not_an_image(path):
    path.write_text("these are my notes, not a picture\n")
    return "cannot read image"


def empty_file(path):
    path.write_bytes(b"")
    return "cannot read image"


def missing_file(path):
    return "not found"


def decompression_bomb(path):
    """A valid PNG header declaring 100000×100000 pixels (Pillow's bomb check refuses it)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    return "too large"


def a_directory(path):
    path.mkdir()
    return "cannot read image"


BAD = [truncated_png, png_signature_only, not_an_image, empty_file, missing_file, decompression_bomb, a_directory]


@pytest.mark.parametrize("case", BAD, ids=lambda f: f.__name__)
def test_unreadable_images_are_refused_in_one_line(case, ckpt, tmp_path):
    src = tmp_path / "input.png"
    words = case(src)
    with pytest.raises(UQDMError, match=words):
        load_image(src)
    run = run_cli(["compress", "--ckpt", str(ckpt), str(src), "-o", str(tmp_path / "x.uqdm"), "--tile", str(TILE)])
    assert one_line_error(run), (run.code, run.stderr, run.error)
    assert words in run.stderr[0]
    assert not (tmp_path / "x.uqdm").exists()


def test_one_bad_image_among_good_ones_fails_alone(ckpt, tmp_path):
    """The good image is compressed; the bad one is one error line, then a summary, exit 2."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    expected = rgb(good)
    truncated_png(bad)
    run = run_cli(["compress", "--ckpt", str(ckpt), str(good), str(bad), "--out-dir", str(tmp_path / "c"), "--tile", str(TILE)])
    assert run.error is None and run.code == 2, (run.error, run.stderr)
    assert run.stderr == [f"uqdm: error: cannot read image {bad}: " + run.stderr[0].split(": ", 3)[3],
                          "uqdm: error: 1 of 2 inputs failed; 1 compressed"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["good.uqdm"]
    run = run_cli(["decompress", "--ckpt", str(ckpt), str(tmp_path / "c" / "good.uqdm"), "-o", str(tmp_path / "good.out.png")])
    assert run.code == 0 and torch.equal(load_image(tmp_path / "good.out.png"), expected)


@pytest.mark.parametrize("case", [rgba16, lab_profile], ids=lambda f: f.__name__)
def test_what_an_input_loses_is_said_recorded_and_refused_with_strict(case, ckpt, tmp_path):
    """One warning line at compression, the losses in the header (`uqdm info`), and with --strict
    one error line and no file."""
    src = tmp_path / "in.png"
    case(src)
    lost = load_image_and_losses(src).lost
    out = tmp_path / "x.uqdm"
    run = run_cli(["compress", "--ckpt", str(ckpt), str(src), "-o", str(out), "--tile", str(TILE)])
    assert run.code == 0 and run.stderr == [f"uqdm: warning: {src}: a .uqdm file holds 8-bit RGB: {describe(lost)}"]
    info = run_cli(["info", str(out)])
    assert info.code == 0 and json.loads(info.stdout)["header"]["lost"] == list(lost)

    run = run_cli(["compress", "--ckpt", str(ckpt), str(src), "-o", str(tmp_path / "y.uqdm"), "--tile", str(TILE), "--strict"])
    assert one_line_error(run) and run.stderr[0].endswith(f"{describe(lost)} (refused: --strict)"), run.stderr
    assert not (tmp_path / "y.uqdm").exists()
    # a lossless input is recorded as such, and --strict takes it
    rgb(src)
    run = run_cli(["compress", "--ckpt", str(ckpt), str(src), "-o", str(out), "--tile", str(TILE), "--strict"])
    assert run.code == 0 and not run.stderr
    assert json.loads(run_cli(["info", str(out)]).stdout)["header"]["lost"] == []


# --- a large image ----------------------------------------------------------------------------
# In a fresh process: peak RSS after a small image, then after a 16× larger one, through the CLI.
LARGE_IMAGE = r"""
import json, resource, sys
import numpy as np, torch
from PIL import Image
torch.set_num_threads(1)
from uqdm.cli import main
from uqdm.codec.fuzz import save_module, tiny_module
work, tile = sys.argv[1], sys.argv[2]
ckpt = save_module(tiny_module(), f"{work}/tiny.ckpt")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
for side in map(int, sys.argv[3:]):
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side)], axis=2).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(f"{work}/{side}.png")
    main(["compress", "--ckpt", str(ckpt), f"{work}/{side}.png", "-o", f"{work}/{side}.uqdm", "--tile", tile])
    after_compress = peak()
    main(["decompress", "--ckpt", str(ckpt), f"{work}/{side}.uqdm", "-o", f"{work}/{side}.out.png"])
    exact = bool(np.array_equal(np.asarray(Image.open(f"{work}/{side}.out.png").convert("RGB")), pixels))
    out[side] = {"compress": after_compress, "decompress": peak(), "exact": exact}
print(json.dumps(out))
"""
LARGE_TILE = 64  # one 64×64 tile's attention map is 128 MiB in float64 (32 KiB per pixel)
PER_PIXEL_LIMIT = 8192  # bytes of peak memory per additional pixel


def test_a_large_image_costs_memory_per_pixel_not_network_activations_of_all_tiles(tmp_path):
    """From a 128×128 image (4 tiles: one full network sub-batch) to a 192×192 one (9 tiles),
    the peak RSS of `uqdm compress` and `uqdm decompress` grows by well under the 32 KiB per
    added pixel that the attention maps of all tiles at once would take: the network runs in tile
    sub-batches, and what else the codec keeps per pixel (its float64 latents) is small."""
    run = subprocess.run([sys.executable, "-c", LARGE_IMAGE, str(tmp_path), str(LARGE_TILE),
                          "128", "192"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    small, large = result["128"], result["192"]
    assert small["exact"] and large["exact"]
    added = 192 * 192 - 128 * 128
    for step in ("compress", "decompress"):
        per_pixel = (large[step] - small["decompress"]) / added
        assert per_pixel < PER_PIXEL_LIMIT, f"{step}: {per_pixel:.0f} bytes per pixel"
