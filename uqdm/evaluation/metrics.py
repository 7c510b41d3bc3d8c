"""Running rate-distortion figures at every truncation point, as torchmetrics states that
synchronise across processes (sums and counts, never per-rank means)."""

import math

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from .fid import FeatureMoments, frechet_distances
from .quality import LPIPS_MIN_SIDE, psnr_per_image, ssim_per_image


def _means(n: int) -> nn.ModuleList:
    return nn.ModuleList(MeanMetric() for _ in range(n))


def _value(metric: Metric) -> float | None:
    """A computed mean as a float, None where it has no data (0/0)."""
    return _finite(metric.compute())


def _finite(value) -> float | None:
    """A number as a float, None where it is not finite (the PSNR of an exact picture)."""
    value = float(value)
    return value if math.isfinite(value) else None


class ProgressiveScores(nn.Module):
    """Means over images at each of the `n_points` truncation points.

    `bpp[j]`: mean cumulative bits per pixel; per method, at each lossy point (the last point is
    exact and gets no distortion): `psnr` (mean of per-image PSNR over the images that are not
    exact), optionally `ssim` of the kind given ("ssim" or "ms-ssim", see `quality.ssim_kind`),
    `lpips` when an LPIPS network is given (`perceptual.load_lpips`; measured on images of at least
    `quality.LPIPS_MIN_SIDE` px a side only: smaller batches are left out, see `lpips_skipped`) and
    FID when an Inception network is given (see `fid.load_inception`).

    With `per_image`, it also keeps each image's figures in `per_image`, in the order seen (one
    dict per image, held by this process only: not synchronised).
    """

    def __init__(self, n_points: int, methods, ssim: str | None = None, inception: nn.Module | None = None,
                 lpips: nn.Module | None = None, per_image: bool = False):
        super().__init__()
        self.methods = list(methods)
        self.per_image: list[dict] | None = [] if per_image else None
        lossy = n_points - 1
        self.bpp = _means(n_points)
        self.psnr = nn.ModuleDict({m: _means(lossy) for m in self.methods})
        self.ssim_kind = ssim
        self.ssim = nn.ModuleDict({m: _means(lossy) for m in self.methods}) if ssim else None
        self.lpips_net = lpips
        self.lpips = nn.ModuleDict({m: _means(lossy) for m in self.methods}) if lpips is not None else None
        self.lpips_skipped = 0  # images too small for LPIPS
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
        bpp = bits.float() / pixels
        for metric, values in zip(self.bpp, bpp.unbind(1)):
            metric.update(values)
        if self.inception is not None:
            self.real.update(self.inception(images))
        lpips = self.lpips is not None and min(images.shape[-2:]) >= LPIPS_MIN_SIDE
        if self.lpips is not None and not lpips:
            self.lpips_skipped += len(images)
        kinds = ["psnr", *(["ssim"] if self.ssim is not None else []), *(["lpips"] if lpips else [])]
        measured = {kind: {m: [] for m in self.methods} for kind in kinds}  # per point: B values
        for m in self.methods:
            for j, picture in enumerate(pictures[m][:-1]):
                picture = picture.to(self.device)
                psnr = psnr_per_image(picture, images)
                lossy = torch.isfinite(psnr)
                self.psnr[m][j].update(torch.where(lossy, psnr, 0.0), weight=lossy.to(psnr.dtype))
                measured["psnr"][m].append(psnr)
                if self.ssim is not None:
                    ssim = ssim_per_image(picture, images, self.ssim_kind)
                    self.ssim[m][j].update(ssim)
                    measured["ssim"][m].append(ssim)
                if lpips:
                    distance = self.lpips_net(picture, images)
                    self.lpips[m][j].update(distance)
                    measured["lpips"][m].append(distance)
                if self.inception is not None:
                    self.fake[m][j].update(self.inception(picture))
        if self.per_image is not None:
            self._keep_per_image(bpp, measured)

    def _keep_per_image(self, bpp: Tensor, measured: dict[str, dict[str, list[Tensor]]]) -> None:
        """One entry per image: `{"bpp": [per point], kind: {method: [per point, None last]}}`."""
        as_lists = lambda values: torch.stack(values, dim=1).tolist() if values else [[] for _ in bpp]
        columns = {kind: {m: as_lists(values) for m, values in per_method.items()}
                   for kind, per_method in measured.items()}
        for b, row in enumerate(bpp.tolist()):
            entry = {"bpp": row}
            for kind, per_method in columns.items():
                entry[kind] = {m: [_finite(v) for v in values[b]] + [None] for m, values in per_method.items()}
            self.per_image.append(entry)

    def compute(self) -> dict:
        """`{"bpp": [...], "psnr": {method: [..., None]}, "ssim": {...} | None, "lpips": {...} | None,
        "fid": {...} | None}`; lists have one entry per point, None for the exact last point and
        where there is no data."""
        per_method = lambda metrics: {m: [_value(x) for x in metrics[m]] + [None] for m in self.methods}
        return {
            "bpp": [_value(x) for x in self.bpp],
            "psnr": per_method(self.psnr),
            "ssim": per_method(self.ssim) if self.ssim is not None else None,
            "lpips": per_method(self.lpips) if self.lpips is not None else None,
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
        if self.per_image is not None:
            self.per_image.clear()
        self.lpips_skipped = 0
