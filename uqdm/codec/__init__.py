"""The UQDM codec: progressive `.uqdm` files from a universally quantized diffusion model.

`compress` / `decompress` work on uint8 C×H×W tensors of any size (tiled to the model's size);
`truncate` cuts a file to a prefix of whole chunks or layers without the model; `import_official` turns a
released checkpoint folder into a `uqdm` checkpoint. The byte layout is in docs/format.md.

The names below are imported on first use (PEP 562), so that the container format (`parse`,
`truncate`) is usable without importing torch.
"""

import importlib

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
    "import_official": ".official",
    "lightning_checkpoint": ".official",
    "save_checkpoint": ".official",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
