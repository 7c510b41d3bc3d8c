"""The UQDM codec: progressive `.uqdm` files from a universally quantized diffusion model.

`compress` / `decompress` work on uint8 C×H×W tensors of any size (tiled to the model's size);
`truncate` cuts a file to a prefix of whole chunks or layers without the model. The model is a
`uqdm.diffusion.UQDM` (`uqdm.weights.load_model` reads one from a checkpoint); the codec knows
nothing of training. The byte layout is in docs/format.md.

The names below are imported on first use (PEP 562), so that the container format (`parse`,
`truncate`) is usable without importing torch.
"""

from uqdm.lazy import lazy_exports

_HOMES = {
    "Container": ".container",
    "Header": ".container",
    "parse": ".container",
    "truncate": ".container",
    "Decoded": ".codec",
    "Encoded": ".codec",
    "compress": ".codec",
    "compress_progressive": ".codec",
    "decompress": ".codec",
    "fingerprint": ".codec",
    "layer_ideal_bits": ".codec",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
