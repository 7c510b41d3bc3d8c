"""Classical image codecs for comparison: JPEG, WebP, AVIF and JPEG 2000 through Pillow, JPEG XL
through imagecodecs. Every image is encoded to bytes in memory and decoded again; rates come from
the real encoded sizes (headers included), distortions from the decoded pixels."""

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import torch
from PIL import Image, features

from .quality import bits_per_pixel, finite_mean, psnr_per_image, ssim_per_image


@dataclass(frozen=True)
class ClassicalCodec:
    """A codec with one quality knob swept over `qualities` (what the knob means: `knob`)."""

    name: str
    knob: str
    qualities: tuple[float, ...]
    encode: Callable[[np.ndarray, float], bytes]  # H×W×3 uint8, quality -> bytes
    decode: Callable[[bytes], np.ndarray]
    available: Callable[[], bool]


def _pillow_encode(format: str, **options) -> Callable[[np.ndarray, float], bytes]:
    """Encoder through `Image.save(format=...)`; `options` may hold a function of the quality."""

    def encode(pixels: np.ndarray, quality: float) -> bytes:
        buffer = io.BytesIO()
        resolved = {k: v(quality) if callable(v) else v for k, v in options.items()}
        Image.fromarray(pixels, "RGB").save(buffer, format=format, **resolved)
        return buffer.getvalue()

    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


CODECS = {
    codec.name: codec
    for codec in (
        ClassicalCodec(
            "jpeg", "Pillow quality (libjpeg-turbo, 4:2:0, optimised Huffman tables)",
            (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            _pillow_encode("JPEG", quality=int, optimize=True), _pillow_decode, lambda: features.check("jpg"),
        ),
        ClassicalCodec(
            "webp", "Pillow quality (libwebp, lossy)", (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100),
            _pillow_encode("WEBP", quality=int, method=6), _pillow_decode, lambda: features.check("webp"),
        ),
        ClassicalCodec(
            "avif", "Pillow quality (libavif, 4:2:0)", (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100),
            _pillow_encode("AVIF", quality=int), _pillow_decode, lambda: features.check("avif"),
        ),
        ClassicalCodec(
            "jpeg2000", "compression ratio (OpenJPEG, irreversible 9/7 wavelet)",
            (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1.5),
            _pillow_encode("JPEG2000", quality_mode="rates", quality_layers=lambda r: [r], irreversible=True),
            _pillow_decode, lambda: features.check("jpg_2000"),
        ),
        ClassicalCodec(
            "jxl", "imagecodecs level (libjxl quality)", (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99),
            lambda pixels, level: imagecodecs.jpegxl_encode(pixels, level=level),
            imagecodecs.jpegxl_decode, lambda: bool(imagecodecs.JPEGXL.available),
        ),
    )
}


def measure(codec: ClassicalCodec, image: torch.Tensor, quality: float, ssim: str = "ssim") -> dict:
    """One image coded at one quality: `{"bpp", "psnr", "ssim", "encoding_time", "decoding_time"}`
    (real bytes; PSNR in dB, inf where exact; `ssim` of the kind given; seconds)."""
    start = time.perf_counter()
    data = codec.encode(image.permute(1, 2, 0).contiguous().numpy(), quality)
    encoded = time.perf_counter()
    pixels = codec.decode(data)
    decoding_time = time.perf_counter() - encoded
    decoded = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)
    return {"bpp": bits_per_pixel(8 * len(data), image), "psnr": float(psnr_per_image(decoded[None], image[None])),
            "ssim": float(ssim_per_image(decoded[None], image[None], ssim)),
            "encoding_time": encoded - start, "decoding_time": decoding_time}


def sweep(codec: ClassicalCodec, images: Sequence[torch.Tensor], ssim: str = "ssim",
          progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[list[dict]]]:
    """One RD point per quality, each image coded at that quality (`measure`): the means over
    images of bpp, PSNR (exact images left out, see `finite_mean`), `ssim` and the times, and each
    image's figures (per quality, one `measure` per image). `progress(1)` is called after each
    quality."""
    points, per_image = [], []
    for quality in codec.qualities:
        figures = [measure(codec, image, quality, ssim) for image in images]
        mean = lambda key: sum(f[key] for f in figures) / len(figures)
        points.append({"quality": quality, "bpp": mean("bpp"), "psnr": finite_mean(f["psnr"] for f in figures),
                       "ssim": mean("ssim"), "encoding_time": mean("encoding_time"),
                       "decoding_time": mean("decoding_time")})
        per_image.append(figures)
        if progress is not None:
            progress(1)
    return points, per_image
