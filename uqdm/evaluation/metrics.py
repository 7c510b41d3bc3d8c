"""Running rate-distortion figures at every truncation point, as torchmetrics states that
synchronise across processes (sums and counts, never per-rank means)."""

import math

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from .fid import FeatureMoments, frechet_distances
from .quality import psnr_per_image, ssim_per_image


def _means(n: int) -> nn.ModuleList:
    return nn.ModuleList(MeanMetric() for _ in range(n))


def _value(metric: Metric) -> float | None:
    """A computed mean as a float, None where it has no data (0/0)."""
    value = float(metric.compute())
    return value if math.isfinite(value) else None


class ProgressiveScores(nn.Module):
    """Means over images at each of the `n_points` truncation points.

    `bpp[j]`: mean cumulative bits per pixel; per method, at each lossy point (the last point is
    exact and gets no distortion): `psnr` (mean of per-image PSNR over the images that are not
    exact), optionally `ssim` of the kind given ("ssim" or "ms-ssim", see `quality.ssim_kind`) and
    FID when an Inception network is given (see `fid.load_inception`).
    """

    def __init__(self, n_points: int, methods, ssim: str | None = None, inception: nn.Module | None = None):
        super().__init__()
        self.methods = list(methods)
        lossy = n_points - 1
        self.bpp = _means(n_points)
        self.psnr = nn.ModuleDict({m: _means(lossy) for m in self.methods})
        self.ssim_kind = ssim
        self.ssim = nn.ModuleDict({m: _means(lossy) for m in self.methods}) if ssim else None
        self.inception = inception
        self.real = FeatureMoments() if inception is not None else None
        self.fake = (
            nn.ModuleDict({m: nn.ModuleList(FeatureMoments() for _ in range(lossy)) for m in self.methods})
            if inception is not None
            else None
        )

    @property
    def device(self) -> torch.device:
        return self.bpp[0].device

    @torch.no_grad()
    def update(self, images: Tensor, bits: Tensor, pictures: dict[str, list[Tensor]]) -> None:
        """Add a batch: uint8 `images` B×3×H×W, cumulative `bits` B×n_points, and per method the
        n_points pictures (as `progressive.Progression`; the last one, exact, is not read). Inputs
        move to the metrics' device."""
        images, bits = images.to(self.device), bits.to(self.device)
        pixels = images.shape[-2] * images.shape[-1]
        for metric, bpp in zip(self.bpp, (bits.float() / pixels).unbind(1)):
            metric.update(bpp)
        if self.inception is not None:
            self.real.update(self.inception(images))
        for m in self.methods:
            for j, picture in enumerate(pictures[m][:-1]):
                picture = picture.to(self.device)
                psnr = psnr_per_image(picture, images)
                lossy = torch.isfinite(psnr)
                self.psnr[m][j].update(torch.where(lossy, psnr, 0.0), weight=lossy.to(psnr.dtype))
                if self.ssim is not None:
                    self.ssim[m][j].update(ssim_per_image(picture, images, self.ssim_kind))
                if self.inception is not None:
                    self.fake[m][j].update(self.inception(picture))

    def compute(self) -> dict:
        """`{"bpp": [...], "psnr": {method: [..., None]}, "ssim": {...} | None, "fid": {...} | None}`;
        lists have one entry per point, None for the exact last point and where there is no data."""
        per_method = lambda metrics: {m: [_value(x) for x in metrics[m]] + [None] for m in self.methods}
        return {
            "bpp": [_value(x) for x in self.bpp],
            "psnr": per_method(self.psnr),
            "ssim": per_method(self.ssim) if self.ssim is not None else None,
            "fid": self._fid() if self.inception is not None else None,
        }

    def _fid(self) -> dict[str, list[float | None]]:
        real = self.real.compute()
        return {m: frechet_distances(real, [x.compute() for x in self.fake[m]]) + [None] for m in self.methods}

    def reset(self) -> None:
        """Forget every image seen so far."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
