"""Image I/O shared by the codec, the evaluation and the data modules.

Images are ``uint8`` tensors of shape 3×H×W (RGB) throughout.
"""

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from uqdm.atomic import write_atomic
from uqdm.errors import UQDMError
from uqdm.input_losses import LOSSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Modes whose conversion to RGB keeps every value (gray repeated, palette looked up).
EXACT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")


@dataclass(frozen=True)
class LoadedImage:
    """An image file as a uint8 3×H×W RGB tensor, and what of the file it lacks (`uqdm.input_losses`)."""

    image: torch.Tensor
    lost: tuple[str, ...]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a uint8 3×H×W RGB tensor (see `load_image_and_losses`)."""
    return load_image_and_losses(path).image


def load_image_and_losses(path: str | os.PathLike) -> LoadedImage:
    """Read an image file as a uint8 3×H×W RGB tensor, and say what of the file it could not keep.

    Any Pillow mode is accepted: grayscale becomes gray RGB; 16-bit data (``I;16``, ``I``, and 16-bit
    colour PNGs, which Pillow itself truncates) is scaled by 255/65535 and rounded; ``F`` is clipped to
    0..255; palette and CMYK go through Pillow's conversion. Transparency (RGBA, LA, palette or tRNS) is
    composited onto a white background. EXIF orientation is applied. Missing, unreadable, truncated and
    oversized (more than ``Image.MAX_IMAGE_PIXELS`` pixels) files raise :class:`UQDMError`.

    Reported as lost (`LOSSES`), only where information actually goes: transparency where a pixel is
    not opaque; samples of more than 8 bits that are not exact 8-bit values (16-bit v = 257·k scales
    exactly); an ICC profile other than sRGB (the pixels are kept as stored, and read as sRGB);
    colours of modes other than gray, palette and RGB (CMYK, YCbCr, Lab, ...); frames or pages after
    the first.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                decoded, eight_bit = _decode(img, path)
                lost = _losses(img, decoded, eight_bit)
                pixels = _composite_on_white(decoded)
                oriented = Image.fromarray(pixels, "RGB")
                oriented.info["exif"] = img.getexif().tobytes()  # orient after conversion, by the source's EXIF
    except FileNotFoundError:
        raise UQDMError(f"image file not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UQDMError(f"image too large: {path} has more than {Image.MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, imagecodecs.PngError) as e:
        raise UQDMError(f"cannot read image {path}: {_one_line(e)}") from None
    return LoadedImage(_to_tensor(np.asarray(ImageOps.exif_transpose(oriented))), lost)


def _losses(img: Image.Image, pixels: np.ndarray, eight_bit: bool) -> tuple[str, ...]:
    """Which `LOSSES` apply to `img`, whose pixels `_decode` gave (0..255 scale, alpha last if any)."""
    found = set()
    if pixels.shape[2] in (2, 4) and (pixels[..., -1] < 255).any():
        found.add("alpha")
    if not eight_bit:
        found.add("depth")
    if not _is_srgb(img.info.get("icc_profile")):
        found.add("profile")
    if img.mode not in EXACT_MODES and not img.mode.startswith(("I", "F")):
        found.add("colours")
    if getattr(img, "n_frames", 1) > 1:
        found.add("frames")
    return tuple(name for name in LOSSES if name in found)


def _is_srgb(icc_profile: bytes | None) -> bool:
    """No embedded profile, or one that describes itself as sRGB (what a PNG without one is read as)."""
    if not icc_profile:
        return True
    try:
        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)))
    except (OSError, ImageCms.PyCMSError):
        return False
    return description.strip().startswith("sRGB")


def _decode(img: Image.Image, path: Path) -> tuple[np.ndarray, bool]:
    """Pixels of a loaded image as H×W×C on a 0..255 scale (C = 1, 2: gray, +alpha; 3, 4: RGB, +alpha),
    and whether all of them are 8-bit values (16-bit ones are divided by 65535/255 = 257)."""
    if img.format == "PNG" and img.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
        scaled = imagecodecs.png_decode(path.read_bytes()) / 257
    elif img.mode.startswith("I"):
        scaled = np.asarray(img, dtype=np.float64) / 257
    elif img.mode == "F":
        scaled = np.asarray(img, dtype=np.float64)
    else:
        pixels = np.asarray(img.convert("RGBA" if img.has_transparency_data else "RGB"))
        return pixels.reshape(*pixels.shape[:2], -1), True
    pixels = np.clip(scaled, 0, 255)
    return pixels.reshape(*pixels.shape[:2], -1), bool(np.array_equal(scaled, np.rint(pixels)))


def _png_bit_depth(path: Path) -> int:
    """Bit depth from a PNG's IHDR chunk (which always comes first)."""
    with open(path, "rb") as f:
        return f.read(25)[24]


def _composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """Flatten any alpha channel onto white and expand gray to RGB, as uint8 H×W×3."""
    if pixels.shape[2] in (2, 4):
        alpha = pixels[..., -1:] / 255
        pixels = pixels[..., :-1] * alpha + 255 * (1 - alpha)
    if pixels.dtype != np.uint8:
        pixels = np.rint(pixels).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(pixels, (*pixels.shape[:2], 3)))


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 array → contiguous 3×H×W uint8 tensor (a copy)."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    _check_image(image)
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 3×H×W image tensor, got {image.dtype} {tuple(image.shape)}")


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a uint8 3×H×W tensor as a PNG file, atomically (see :func:`uqdm.atomic.atomic_write`)."""
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def box_resize(image: Image.Image | torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize with Pillow's BOX filter so that the shorter side becomes ``short_side`` (aspect kept)."""
    pil = _to_pil(image) if isinstance(image, torch.Tensor) else _rgb_pil(image)
    w, h = pil.size
    short = min(w, h)
    return _to_tensor(np.asarray(pil.resize((round(w * short_side / short), round(h * short_side / short)), Image.BOX)))


def _rgb_pil(image: Image.Image) -> Image.Image:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB PIL image, got mode {image.mode}; use load_image for files")
    return image


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central size×size crop at offsets ((W−size)//2, (H−size)//2)."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}×{size} from a {w}×{h} image")
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size].contiguous()


def box_resize_center_crop(image: Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation preparation: BOX-resize the short side to ``size``, then take the central size×size crop."""
    return center_crop(box_resize(image, size), size)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix, case-insensitive) anywhere below ``folder``, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UQDMError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UQDMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    return files


def load_images(path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """(name, uint8 3×H×W) pairs from a folder of images, a single image file, or a ``.npy`` file.

    Folder images are named by their path relative to the folder. A ``.npy`` file holds uint8 images
    N×3×H×W or N×H×W×3 (the former wins if both fit); its images are named by zero-padded index.
    """
    path = Path(path)
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), load_image(p)) for p in image_files(path)]
    if path.suffix.lower() == ".npy":
        return _load_npy_images(path)
    return [(path.name, load_image(path))]


def _load_npy_images(path: Path) -> list[tuple[str, torch.Tensor]]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UQDMError(f"cannot read {path}: {_one_line(e)}") from None
    if array.dtype != np.uint8 or array.ndim != 4 or 3 not in (array.shape[1], array.shape[3]):
        raise UQDMError(f"{path}: expected uint8 images N×3×H×W or N×H×W×3, got {array.dtype} {array.shape}")
    if array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    width = len(str(max(len(array) - 1, 0)))
    return [(f"{i:0{width}d}", _to_tensor(image)) for i, image in enumerate(array)]
