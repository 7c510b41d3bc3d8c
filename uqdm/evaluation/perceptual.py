"""LPIPS (Zhang et al., 2018) with torchmetrics' network: AlexNet's features with torchvision's
ImageNet weights (fetched once, see `pretrained`) and the LPIPS linear heads that torchmetrics ships.

    LPIPS(x, y) = Σ_l (1 / H_l W_l) Σ_{h,w} ‖ w_l ⊙ (f̂_l(x)_{hw} − f̂_l(y)_{hw}) ‖²

over AlexNet's five ReLU outputs l, f̂ the features scaled to unit length along channels, w_l the
learned heads; 0 for identical pictures, larger is more different.
"""

import os

import torch
from torch import Tensor, nn
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchvision.models import AlexNet_Weights, alexnet

from uqdm.errors import UQDMError
from uqdm.weights import safe_load

from .pretrained import fetch_weights

URL_ALEXNET = AlexNet_Weights.IMAGENET1K_V1.url


class LPIPS(nn.Module):
    """LPIPS of each picture against its image, both uint8 B×3×H×W of at least
    `quality.LPIPS_MIN_SIDE` pixels a side; never trains."""

    def __init__(self, alexnet_state: dict[str, Tensor]):
        """`alexnet_state`: torchvision AlexNet's state dict (its `features.*` entries are used)."""
        super().__init__()
        backbone = alexnet().features
        prefix = "features."
        try:
            backbone.load_state_dict({k[len(prefix):]: v for k, v in alexnet_state.items() if k.startswith(prefix)})
        except RuntimeError as e:
            raise UQDMError(f"not AlexNet's weights: {str(e).splitlines()[0]}") from None
        self.net = _NoTrainLpips(net="alex", pretrained=True, pnet_rand=True)  # heads: torchmetrics'
        layers = self.net.net
        for part in (layers.slice1, layers.slice2, layers.slice3, layers.slice4, layers.slice5):
            for index, layer in part.named_children():
                layer.load_state_dict(backbone[int(index)].state_dict())
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, pictures: Tensor, images: Tensor) -> Tensor:
        """Per-image LPIPS (B values)."""
        return self.net(pictures.float() / 255, images.float() / 255, normalize=True).flatten()


def load_lpips(weights: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS with the AlexNet weights file `weights`, fetched from torchvision's release into that
    path on first use (default: the torch.hub cache); checked to hold tensors only.

    Raises:
        WeightsUnavailable: the file is absent and cannot be downloaded (offline): LPIPS is off.
        UQDMError: the file is not AlexNet's state dict.
    """
    path = fetch_weights(URL_ALEXNET, weights, "LPIPS", "the LPIPS weights option")
    return LPIPS(safe_load(path))
