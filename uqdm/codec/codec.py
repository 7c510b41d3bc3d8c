"""Compress images into `.uqdm` files and decode them, progressively (symbols as in docs/METHOD.md).

One walk down the hierarchy serves both directions. All tiles of all images in a call go through
each step together; step `i` needs the prior p(z_s | z_t) at the current latents, the shared dither
`u`, and then either the encoder's `k = round((μ_q − μ_p)/Δ + u)` or the decoder's decoded `k`;
both sides continue from `z_s = μ_p + (k − u)·Δ`. The network runs in float64 in sub-batches of
`batch_tiles` tiles; last-bit differences between sub-batch sizes never reach the tables (see
`tables`).
"""

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from uqdm.diffusion import RECONSTRUCTIONS, UQDM, GaussianDiffusion, Prior, Step, to_centered, universal_quantize
from uqdm.errors import UQDMError
from uqdm.schedules import alpha_sigma

from . import coder, randomness, tables
from .container import FINGERPRINT_BYTES, Header, pack, parse
from .tiling import from_tiles, grid, to_tiles

BATCH_TILES = 4  # tiles per network call: float64 attention over 64×64 pixels is memory-bound
IDEAL_SLICE = 1 << 13  # symbols per slice when evaluating the 256-way p(x_raw | z_0)


@dataclass
class Decoded:
    """A decoded file: the picture at its last truncation point, and optionally all of them.

    `points[p]` is the picture after p chunks (p = 0: z₁ only; p = T + 1: the exact image).
    `ideal_bits[c]` is −log₂ of chunk c's symbols' probabilities under the (unquantised) model.
    """

    header: Header
    image: Tensor
    points: list[Tensor] | None
    ideal_bits: list[float]


class SubBatched(nn.Module):
    """Calls a score network on at most `size` samples at a time and concatenates the outputs."""

    def __init__(self, network: nn.Module, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"batch_tiles must be at least 1, got {size}")
        self.network, self.size = network, size
        self.n_channels = network.n_channels

    def forward(self, z: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor | None]:
        outs = [self.network(part, gamma_t) for part in z.split(self.size)]
        eps = torch.cat([o[0] for o in outs])
        return eps, (None if outs[0][1] is None else torch.cat([o[1] for o in outs]))


def as_uqdm(model: nn.Module) -> UQDM:
    """The UQDM of a `UQDMModule` (or the UQDM itself); Gaussian diffusion has no real code."""
    model = getattr(model, "model", model)
    if isinstance(model, GaussianDiffusion) or not isinstance(model, UQDM):
        raise UQDMError("only a universally quantized (diffusion: uniform) model can compress; "
                        f"got {type(model).__name__}")
    return model


def fingerprint(model: nn.Module) -> bytes:
    """First 8 bytes of SHA-256 over the model's configuration (sorted JSON) and every state_dict
    tensor (sorted names, shapes, float64 bytes)."""
    model = as_uqdm(model)
    network = model.network
    config = {k: getattr(model, k) for k in ("n_timesteps", "prior_type", "base_prior_scale", "clip_prior_mean")}
    config["classes"] = [type(m).__name__ for m in (model, model.schedule, network)]
    config["network"] = {
        k: v for k, v in vars(network).items()
        if isinstance(v, (bool, int, float, str)) and k != "training" and not k.startswith("_")
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.digest()[:FINGERPRINT_BYTES]


def codec_model(model: nn.Module, batch_tiles: int = BATCH_TILES) -> UQDM:
    """A float64, eval-mode copy of the model whose network runs in sub-batches."""
    net = copy.deepcopy(as_uqdm(model)).double().eval()
    net.network = SubBatched(net.network, batch_tiles)
    return net


def _spans(headers: list[Header]) -> list[slice]:
    """Each image's rows in the concatenated tile batch."""
    spans, start = [], 0
    for h in headers:
        n = math.prod(grid(h.height, h.width, h.tile))
        spans.append(slice(start, start + n))
        start += n
    return spans


def _shared(headers: list[Header], channels: int, draw: Callable[[int, tuple[int, ...]], Tensor]) -> Tensor:
    """A shared draw `draw(seed, shape)` for every image's tiles, concatenated in batch order."""
    spans = _spans(headers)
    return torch.cat([draw(h.seed, (s.stop - s.start, channels, h.tile, h.tile)) for h, s in zip(headers, spans)])


# A step's coder: (step index, z_t, prior, step, u) -> k, and it writes or reads the chunk.
StepCoder = Callable[[int, Tensor, Prior, Step, Tensor], Tensor]


def _descend(net: UQDM, headers: list[Header], channels: int, n_steps: int, code: StepCoder,
             on_point: Callable[[int, Tensor, Prior], None] | None = None) -> Tensor:
    """Run `n_steps` steps from the shared z₁ for all tiles; return the latents reached."""
    device = next(net.parameters()).device
    z = _shared(headers, channels, randomness.top_latent).to(device)
    for i in range(n_steps):
        st = net.step(i)
        prior = net.prior(z, st)
        if not (torch.isfinite(prior.mean).all() and torch.isfinite(prior.std).all()):
            raise UQDMError(f"the model's prior is not finite at step {i + 1}; is the checkpoint broken?")
        if on_point is not None:
            on_point(i, z, prior)
        u = _shared(headers, channels, lambda seed, shape: randomness.dither(seed, i, shape)).to(device)
        k = code(i, z, prior, st, u)
        z = prior.mean + (k - u) * st.delta
    return z


def _step_model(net: UQDM, prior: Prior, st: Step, u: Tensor, span: slice) -> tables.StepModel:
    return tables.step_model(prior.std[span].cpu(), st.delta.cpu(), u[span].cpu(), net.prior_type)


def _lossless_model(net: UQDM, z_0: Tensor) -> tables.LosslessModel:
    gamma_0 = net.gamma_at(0.0)
    alpha_0, _ = alpha_sigma(gamma_0)
    return tables.lossless_model(z_0.cpu(), alpha_0.cpu(), gamma_0.cpu())


def _check_images(images: list[Tensor], channels: int) -> int:
    if not images:
        raise ValueError("no images to compress")
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != channels:
            raise ValueError(f"expected uint8 {channels}×H×W images, got {image.dtype} {tuple(image.shape)}")
    return channels


def _n_chunks(steps: int | None, n_timesteps: int) -> int:
    """Chunks to code or decode: `steps` (0 … T + 1), or all T + 1 when None."""
    total = n_timesteps + 1
    if steps is None:
        return total
    if not 0 <= steps <= total:
        raise UQDMError(f"steps must be between 0 and {total} (T + 1: lossless), got {steps}")
    return steps


@torch.inference_mode()
def compress(model: nn.Module, images: list[Tensor], steps: int | None = None, seed: int = 0,
             tile: int = 64, batch_tiles: int = BATCH_TILES,
             on_chunk: Callable[[int], None] | None = None) -> list[bytes]:
    """Compress uint8 C×H×W images (any sizes) into `.uqdm` files, coding all tiles together.

    `steps` = number of chunks: K ≤ T gives a lossy file of K steps; None (or T + 1) adds the
    lossless chunk. `on_chunk(c)` is called once the first c chunks of every file are coded (c = 0:
    set-up done, nothing coded yet). Returns one file's bytes per image.
    """
    fp = fingerprint(model)
    net = codec_model(model, batch_tiles)
    channels = _check_images(images, net.network.n_channels)
    n_chunks = _n_chunks(steps, net.n_timesteps)
    try:
        headers = [Header(fp, im.shape[1], im.shape[2], tile, net.n_timesteps, seed) for im in images]
    except ValueError as e:
        raise UQDMError(f"cannot compress: {e}") from None
    spans = _spans(headers)
    device = next(net.parameters()).device
    x_raw = torch.cat([to_tiles(im, tile) for im in images])
    x = to_centered(x_raw).to(device, torch.float64)
    chunks: list[list[bytes]] = [[] for _ in images]

    def code(i: int, z: Tensor, prior: Prior, st: Step, u: Tensor) -> Tensor:
        k, _ = universal_quantize(net.posterior_mean(x, z, st), prior.mean, st.delta, u)
        k_cpu = k.to("cpu", torch.int64)
        for n, span in enumerate(spans):
            chunks[n].append(coder.encode(_step_model(net, prior, st, u, span), k_cpu[span].flatten()))
        if on_chunk is not None:
            on_chunk(i + 1)
        return k

    if on_chunk is not None:
        on_chunk(0)
    z = _descend(net, headers, channels, min(n_chunks, net.n_timesteps), code)
    if n_chunks > net.n_timesteps:
        for n, span in enumerate(spans):
            chunks[n].append(coder.encode(_lossless_model(net, z[span]), x_raw[span].flatten().long()))
        if on_chunk is not None:
            on_chunk(net.n_timesteps + 1)
    return [pack(h, c) for h, c in zip(headers, chunks)]


@torch.inference_mode()
def decompress(model: nn.Module, data: bytes, steps: int | None = None, method: str = "denoise",
               all_points: bool = False, batch_tiles: int = BATCH_TILES,
               on_point: Callable[[int, Tensor], None] | None = None) -> Decoded:
    """Decode a `.uqdm` file, or a prefix of one, to its last (or its `steps`-th) truncation point.

    A prefix ending inside a chunk decodes its complete chunks (with a warning). `method` is the
    reconstruction of the lossy points ("denoise", "ancestral" or "flow_based"); `all_points`
    also returns the picture at every point up to there. `on_point(p, picture)` is called as soon
    as the picture of each point p up to there is shown (progressive display; every point's
    picture is made, as with `all_points`).

    Raises:
        UQDMError: a corrupt file, a file of another model, or `steps` beyond the file's chunks.
    """
    if method not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction {method!r}; choose one of {RECONSTRUCTIONS}")
    container = parse(data)
    header = container.header
    fp = fingerprint(model)
    if header.fingerprint != fp:
        raise UQDMError(f"this file was made with a different model (fingerprint {header.fingerprint.hex()}, "
                        f"this model's is {fp.hex()}); pass the checkpoint it was compressed with")
    net = codec_model(model, batch_tiles)
    T = net.n_timesteps
    if header.n_timesteps != T:
        raise UQDMError(f"the file's header names T = {header.n_timesteps} steps but the model has {T}; "
                        "is the file corrupt?")
    n_chunks = len(container.chunks) if steps is None else _n_chunks(steps, T)
    if n_chunks > len(container.chunks):
        raise UQDMError(f"the file holds {len(container.chunks)} complete chunks; cannot decode {n_chunks}")
    channels = net.network.n_channels
    ideal: list[float] = []
    pictures: list[Tensor] = []

    def code(i: int, z: Tensor, prior: Prior, st: Step, u: Tensor) -> Tensor:
        span = slice(0, len(z))
        k = coder.decode(_step_model(net, prior, st, u, span), container.chunks[i], i + 1).view(z.shape)
        ideal.append(tables.ideal_step_bits(prior.std.cpu(), st.delta.cpu(), u.cpu(), k.double(), net.prior_type))
        return k.to(z.device, torch.float64)

    def picture(i: int, z: Tensor, prior: Prior | None = None) -> None:
        gen = randomness.generator(header.seed, "ancestral", i, z.device)
        shown(from_tiles(net.reconstruct(z, i, method, prior, gen).cpu(), header.height, header.width))

    def shown(image: Tensor) -> None:
        pictures.append(image)
        if on_point is not None:
            on_point(len(pictures) - 1, image)

    every_point = all_points or on_point is not None
    z = _descend(net, [header], channels, min(n_chunks, T), code, picture if every_point else None)
    if n_chunks <= T or every_point:
        picture(min(n_chunks, T), z)
    if n_chunks > T:
        model_0 = _lossless_model(net, z)
        x_raw = coder.decode(model_0, container.chunks[T], T + 1).view(z.shape)
        ideal.append(_lossless_ideal_bits(net, x_raw, z))
        shown(from_tiles(x_raw.to(torch.uint8), header.height, header.width))
    return Decoded(header, pictures[-1], pictures if all_points else None, ideal)


def _lossless_ideal_bits(net: UQDM, x_raw: Tensor, z_0: Tensor) -> float:
    """−log₂ p(x_raw | z_0) summed, in slices (the 256-way table of a large image is gigabytes)."""
    x, z = x_raw.flatten().to(z_0.device), z_0.flatten()
    nats = sum(-net.log_likelihood(xs, zs).sum().item() for xs, zs in zip(x.split(IDEAL_SLICE), z.split(IDEAL_SLICE)))
    return nats / math.log(2)


def chunk_ideal_bits(model: nn.Module, data: bytes) -> list[float]:
    """Per chunk, −log₂ of its coded symbols' probabilities under the unquantised model."""
    return decompress(model, data).ideal_bits
