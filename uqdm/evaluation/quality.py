"""Per-image distortion measures (torchmetrics) on uint8 B×3×H×W batches, and their means."""

import math

from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# MS-SSIM's five scales with an 11-pixel window need a short side above (11 − 1)·2⁴ = 160.
MS_SSIM_MIN_SIDE = 161
# LPIPS's AlexNet strides and pools leave nothing of a picture whose shorter side is under 31 px.
LPIPS_MIN_SIDE = 31


def psnr_per_image(pictures: Tensor, images: Tensor) -> Tensor:
    """10·log₁₀(255² / MSE) of each image in dB (+inf where a picture is exact)."""
    return peak_signal_noise_ratio(
        pictures.float(), images.float(), data_range=255.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_kind(images) -> str:
    """"ms-ssim" when every image (3×H×W tensors) is large enough for its five scales, else "ssim"."""
    return "ms-ssim" if min(min(image.shape[-2:]) for image in images) >= MS_SSIM_MIN_SIDE else "ssim"


def ssim_per_image(pictures: Tensor, images: Tensor, kind: str) -> Tensor:
    """SSIM or MS-SSIM (`kind`, see `ssim_kind`) of each image, data range 255."""
    measure = {
        "ssim": structural_similarity_index_measure,
        "ms-ssim": multiscale_structural_similarity_index_measure,
    }[kind]
    return measure(pictures.float(), images.float(), data_range=255.0, reduction="none")


def finite_mean(values) -> float | None:
    """Mean of the finite values (exact pictures have infinite PSNR); None if there are none."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def bits_per_pixel(n_bits, image: Tensor) -> float:
    """Bits per pixel of an image (a pixel is one RGB triple: H·W of them)."""
    return float(n_bits) / (image.shape[-2] * image.shape[-1])
