"""The real `.uqdm` files of an evaluation, written and read back with a stopwatch: seconds from the
start of the call to each truncation point, what CompressAI's result files call `encoding_time`
and `decoding_time`."""

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from uqdm import codec
from uqdm.codec.codec import BATCH_TILES, Encoded
from uqdm.options import DEFAULT_LAYERS

from .quality import psnr_per_image


def encode_timed(module: nn.Module, image: Tensor, *, seed: int, tile: int, methods: Sequence[str] = (),
                 batch_tiles: int = BATCH_TILES, layers: int = DEFAULT_LAYERS) -> tuple[Encoded, list[float]]:
    """One image's file of `layers` quality layers per step, with its decoder's pictures for `methods`
    and its ideal bits
    (`codec.compress_progressive`), and, per truncation point p (p chunks: z₁ alone, the steps,
    lossless), the seconds until its first p chunks were coded: what an encoder stopping at p
    spends (p = 0: the set-up, model copy and fingerprint included; the pictures, made after the
    last chunk, are not)."""
    times = []
    start = time.perf_counter()
    encoded = codec.compress_progressive(module, [image], [seed], methods, tile=tile, batch_tiles=batch_tiles,
                                         layers=layers, on_chunk=lambda _: times.append(time.perf_counter() - start))[0]
    return encoded, times


def decode_timed(module: nn.Module, data: bytes, image: Tensor) -> tuple[Tensor, list[float], list[float]]:
    """The decoded image; per step's truncation point p (p chunks), the seconds until the decoder
    showed p's denoise picture, having shown every earlier point's (every layer's) on the way
    (progressive display); and the PSNR (dB, inf where exact) of the picture after every layer."""
    times, psnr = [], []

    def shown(_, picture: Tensor) -> None:
        times.append(time.perf_counter() - start)
        psnr.append(psnr_per_image(picture[None], image[None]).item())

    start = time.perf_counter()
    decoded = codec.decompress(module, data, on_point=shown)
    header = decoded.header
    return decoded.image, [times[header.records_after(k)] for k in range(header.n_timesteps + 2)], psnr


def decode_each(module: nn.Module, files: Sequence[bytes], images: Sequence[Tensor],
                encoder_psnr: Sequence[list[float]] | None = None, progress: Callable[[int], None] | None = None
                ) -> tuple[list[list[float]], list[str]]:
    """Decode every file (`decode_timed`): its decoding times per step point, and a warning for each
    file that does not decode to its image or whose denoise pictures' PSNR after every layer differ
    from `encoder_psnr` (the encoder's walk's, per image; a codec bug; nothing else is affected)."""
    times, warnings = [], []
    for n, (data, image) in enumerate(zip(files, images)):
        decoded, seconds, layer_psnr = decode_timed(module, data, image)
        times.append(seconds)
        if not torch.equal(decoded, image):
            warnings.append(f"the file of image {n} does not decode to the image")
        elif encoder_psnr is not None and layer_psnr != encoder_psnr[n]:
            warnings.append(f"the file of image {n} does not show the encoder's pictures")
        if progress is not None:
            progress(1)
    return times, warnings
