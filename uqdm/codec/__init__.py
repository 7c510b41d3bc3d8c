"""The UQDM codec: progressive `.uqdm` files from a universally quantized diffusion model.

`compress` / `decompress` work on uint8 C×H×W tensors of any size (tiled to the model's size);
`truncate` cuts a file to a prefix of whole chunks without the model; `import_official` turns a
released checkpoint folder into a `uqdm` checkpoint. The byte layout is in docs/format.md.
"""

from .codec import Decoded, chunk_ideal_bits, compress, decompress, fingerprint
from .container import Container, Header, parse, truncate
from .official import import_official, lightning_checkpoint, save_checkpoint

__all__ = [
    "Container",
    "Decoded",
    "Header",
    "chunk_ideal_bits",
    "compress",
    "decompress",
    "fingerprint",
    "import_official",
    "lightning_checkpoint",
    "parse",
    "save_checkpoint",
    "truncate",
]
