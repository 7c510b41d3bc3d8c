"""FID with torch-fidelity's Inception-v3 (as wrapped by torchmetrics), its weights fetched once.

The Inception network runs once per batch of pictures. The real images' feature moments are kept
once, and each (point, method) keeps only its pictures' moments (torchmetrics states, summed
across processes), so measuring many curves costs neither repeated real features nor repeated
square roots of the real covariance.
"""

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics import Metric
from torchmetrics.image.fid import NoTrainInceptionV3

from uqdm.weights import safe_load

from .pretrained import fetch_weights

FEATURES = 2048  # the pool features FID is defined on
Moments = tuple[Tensor, Tensor]  # mean and covariance of features


def inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: `weights`, fetched from torch-fidelity's release into that
    path on first use (default: the torch.hub cache, see `pretrained.fetch_weights`).

    Raises:
        WeightsUnavailable: the file is absent and cannot be downloaded (offline): FID is off.
    """
    return fetch_weights(URL_INCEPTION_V3, weights, "FID", "the FID weights option")


def load_inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (uint8 B×3×H×W in, resized to 299² inside; 2048 features
    out) with the weights of `inception_weights(weights)`, checked to hold tensors only before
    torch-fidelity loads them.

    Raises:
        WeightsUnavailable: the file is absent and cannot be downloaded (offline): FID is off.
        UQDMError: the file is not a plain state dict.
    """
    path = inception_weights(weights)
    safe_load(path)  # refuses anything but tensors (torch-fidelity itself unpickles freely)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURES)],
                              feature_extractor_weights_path=os.fspath(path))


def fid_protocol(n_images: int, weights: str | os.PathLike) -> dict:
    """What an FID figure of `uqdm evaluate` is: the sets, the network and its weights file (name
    and SHA-256), and why it does not compare with FIDs on thousands of images."""
    weights = Path(weights)
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "images": n_images,
        "sets": f"the {n_images} prepared images against their {n_images} reconstructions at each point, per method",
        "network": f"torch-fidelity's FID Inception-v3 (inception-v3-compat), {FEATURES} pool features, "
                   "pictures resized to 299x299 inside",
        "weights": {"file": weights.name, "sha256": digest.hexdigest(), "url": URL_INCEPTION_V3},
        "comparable": f"only with FIDs on the same {n_images} images: with fewer images than features the "
                      "estimate is strongly biased upwards, so it cannot be compared with the paper's FID "
                      "on 10,000 images",
    }


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
