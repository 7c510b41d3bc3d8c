"""FID with torch-fidelity's Inception-v3 (as wrapped by torchmetrics), its weights fetched once.

The Inception network runs once per batch of pictures. The real images' feature moments are kept
once, and each (point, method) keeps only its pictures' moments (torchmetrics states, summed
across processes), so measuring many curves costs neither repeated real features nor repeated
square roots of the real covariance.
"""

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics import Metric
from torchmetrics.image.fid import NoTrainInceptionV3

from uqdm.checkpoints import safe_load

FEATURES = 2048  # the pool features FID is defined on
Moments = tuple[Tensor, Tensor]  # mean and covariance of features


class FIDUnavailable(Exception):
    """The Inception weights can be neither found nor downloaded."""


def default_weights_path() -> Path:
    """Where torch.hub caches downloads (`$TORCH_HOME/hub/checkpoints`), under the release's file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def load_inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (uint8 B×3×H×W in, resized to 299² inside; 2048 features out).

    `weights` is a state-dict file, fetched from torch-fidelity's release into that path on first
    use (default: `default_weights_path()`). The file is checked to hold tensors only before
    torch-fidelity loads it.

    Raises:
        FIDUnavailable: the file is absent and cannot be downloaded (offline).
        UQDMError: the file is not a plain state dict.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, os.fspath(path), progress=False)
        except Exception as e:  # offline, proxy, permissions: all mean "no FID this time"
            raise FIDUnavailable(
                f"FID is off: no Inception weights at {path} and downloading them failed "
                f"({type(e).__name__}: {e}); put torch-fidelity's {URL_INCEPTION_V3.rsplit('/', 1)[-1]} there "
                "or pass its path as the FID weights option"
            ) from e
    safe_load(path)  # refuses anything but tensors (torch-fidelity itself unpickles freely)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURES)],
                              feature_extractor_weights_path=os.fspath(path))


class FeatureMoments(Metric):
    """Σ f, Σ f fᵀ and the number of feature vectors f, synchronised across processes as sums."""

    full_state_update = False

    def __init__(self, num_features: int = FEATURES):
        super().__init__()
        self.add_state("total", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        f = features.double()
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def compute(self) -> Moments | None:
        """Mean and unbiased covariance; None under two feature vectors."""
        n = self.count
        if n < 2:
            return None
        mean = self.total / n
        return mean, (self.outer - n * torch.outer(mean, mean)) / (n - 1)


def frechet_distances(real: Moments | None, fakes: list[Moments | None]) -> list[float | None]:
    """FID of each fake (mean, covariance) against the real one:
    d² = ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2·tr √(Σ_r^½ Σ_f Σ_r^½).

    The last trace is the usual tr √(Σ_r Σ_f). With Σ_r = V Λ Vᵀ (`eigh`, once for all fakes) and
    D = Λ^½ on the k non-zero eigenvalues, Σ_r^½ Σ_f Σ_r^½ = V (D Vᵀ Σ_f V D) Vᵀ has the
    eigenvalues of the symmetric k×k matrix in brackets (k < 2048 when there are fewer images than
    features). None where either side has under two images.
    """
    if real is None:
        return [None] * len(fakes)
    mean_real, cov_real = real
    values, vectors = torch.linalg.eigh(cov_real)
    kept = values > values.max() * 1e-12
    scaled = vectors[:, kept] * values[kept].sqrt()  # V D
    out = []
    for fake in fakes:
        if fake is None:
            out.append(None)
            continue
        mean_fake, cov_fake = fake
        trace_sqrt = torch.linalg.eigvalsh(scaled.T @ cov_fake @ scaled).clamp(min=0).sqrt().sum()
        d2 = (mean_real - mean_fake).square().sum() + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt
        out.append(float(d2))
    return out
