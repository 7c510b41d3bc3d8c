"""Compress images into `.uqdm` files and decode them, progressively (symbols as in docs/equations.md).

Both directions are consumers of one `walk.Walk` from the shared z₁, fed by `_coded_steps`: at
step `i` it gives the prior p(z_s | z_t) at the current latents, the shared dither `u` and each
image's entropy model (the same calls on both sides); the encoder then sends
`k = round((μ_q − μ_p)/Δ + u)`, the decoder reads `k`, and both continue from
`z_s = μ_p + (k − u)·Δ`. All tiles of all images in a call go through each step together. The
network runs in one of two modes, recorded in the header: `portable`, float64 in sub-batches of
`batch_tiles` tiles, whose last-bit differences between sub-batch sizes, thread counts and devices
never reach the tables (see `tables`); or `fast`, float32 one tile per call on one thread per call
(see `fast`), exact wherever the float32 kernels are the encoder's, which the header's check value
verifies. Each step's symbols are coded in L quality
layers that each narrow the symbols' intervals (`layers`); a prefix that ends after some layers of a
step decodes them and takes each symbol's conditional mean within its interval (`_partial_latent`).
"""

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from uqdm.diffusion import RECONSTRUCTIONS, UQDM, Prior, Step, to_centered
from uqdm.errors import UQDMError
from uqdm.options import BATCH_TILES, DEFAULT_LAYERS
from uqdm.schedules import alpha_sigma
from uqdm.walk import Node, Walk, dequantize, quantization_index

from . import coder, randomness, tables
from .container import CHECK_BYTES, DEFAULT_GRID, DEFAULT_MODE, FINGERPRINT_BYTES, GRIDS, MODES, Header, pack, parse
from .fast import PerTile
from .layers import Refinement
from .tiling import from_tiles, grid, to_tiles
from .windows import Windowed

IDEAL_SLICE = 1 << 13  # symbols per slice when evaluating the 256-way p(x_raw | z_0)


@dataclass
class Decoded:
    """A decoded file: the picture at its last truncation point, and optionally all of them.

    `points[p]` is the picture after p layers (p = 0: z₁ only; p = T·L + 1: the exact image).
    `ideal_bits[n]` is −log₂ of layer n's symbols' probabilities under the (unquantised) model
    (empty when decoded without `ideal`).
    """

    header: Header
    image: Tensor
    points: list[Tensor] | None
    ideal_bits: list[float]


@dataclass
class Encoded:
    """A file, and what decoding it shows: `points[method][p]` is the picture after p layers
    (`decompress(..., method=method, all_points=True).points`), `ideal_bits[c]` as in `Decoded`."""

    data: bytes
    points: dict[str, list[Tensor]]
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


# The network's hyperparameters that the fingerprint has covered since format version 1 (the
# others are implied by the state_dict's names and shapes, or have no effect in eval mode; not
# norm_groups and n_attention_heads, which adding would change every model's fingerprint).
FINGERPRINTED_NETWORK_FIELDS = ("n_channels", "embedding_dim", "use_fourier_features", "learned_prior_scale",
                                "gamma_min", "gamma_max")


def as_uqdm(model: nn.Module) -> UQDM:
    """`model` itself if it can code (a UQDM); Gaussian diffusion has no real code."""
    if not isinstance(model, UQDM):
        raise UQDMError("only a universally quantized (diffusion: uniform) model can compress; "
                        f"got {type(model).__name__}")
    return model


def fingerprint(model: UQDM) -> bytes:
    """First 8 bytes of SHA-256 over the model's configuration (sorted JSON) and every state_dict
    tensor (sorted names, shapes, float64 bytes)."""
    model = as_uqdm(model)
    network = model.network
    config = {k: getattr(model, k) for k in ("n_timesteps", "prior_type", "base_prior_scale", "clip_prior_mean")}
    config["classes"] = [type(m).__name__ for m in (model, model.schedule, network)]
    config["network"] = {k: getattr(network.config, k) for k in FINGERPRINTED_NETWORK_FIELDS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.digest()[:FINGERPRINT_BYTES]


class WindowedUQDM(UQDM):
    """The codec's copy of a UQDM: its network, a `windows.Windowed`, is told the step of each call."""

    def predict(self, z_t: Tensor, st: Step) -> tuple[Tensor, Tensor | None]:
        return self.network(z_t, st.gamma_t, st.i)


def codec_model(model: UQDM, batch_tiles: int = BATCH_TILES, mode: str = DEFAULT_MODE, tile: int = 64,
                grid_kind: str = DEFAULT_GRID, tiles: int = 0) -> UQDM:
    """A float64, eval-mode copy of the model whose network runs on the windows of `windows` (the
    step's grid, `grid_kind` "shifted" or "fixed"), `batch_tiles` windows per call (portable), or
    in float32 one window per call, as many calls at once as torch has threads (fast; the outputs
    of the first `tiles` windows, step 0's, are kept for the check value)."""
    if mode not in MODES:
        raise UQDMError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if grid_kind not in GRIDS:
        raise UQDMError(f"unknown grid {grid_kind!r}; choose one of {', '.join(GRIDS)}")
    net = copy.deepcopy(as_uqdm(model)).double().eval()
    net.__class__ = WindowedUQDM  # the same model and state, whose network calls name their step
    threads = torch.get_num_threads()
    if mode == "fast":
        inner, batch = PerTile(net.network, threads, recorded=tiles), max(batch_tiles, threads)
    else:
        inner, batch = SubBatched(net.network, batch_tiles), batch_tiles
    net.network = Windowed(inner, tile, shifted=grid_kind == "shifted", batch=batch)
    return net


def _layouts(headers: list[Header]) -> list[tuple[int, int]]:
    """Each image's base grid: (rows, cols) of tiles."""
    return [grid(h.height, h.width, h.tile) for h in headers]


def _verify(net: UQDM, header: Header) -> None:
    """In fast mode, refuse a file whose first network outputs hash differently here."""
    if header.mode == "fast" and net.network.network.check_value(slice(None)) != header.check:
        raise UQDMError("this file was compressed in fast mode on a machine whose float32 network arithmetic "
                        "differs from this one's (its check value does not match); decode it on a machine "
                        "like the encoder's, or compress with --mode portable")


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


def _coded_steps(net: UQDM, walk: Walk, headers: list[Header], channels: int, ideal: bool
                 ) -> Iterator[tuple[Node, Tensor, list[tables.StepModel]]]:
    """The walk's steps, each with the shared dither u and every image's entropy model of k (with
    the prior's unrounded std when `ideal`: for ideal bits).

    Encoder and decoder both call this: their priors, dithers and tables are made by the same code.
    The consumer sets each node's z_s (`node.quantize(k, u)`). Nothing of a step is held here once
    the consumer asks for the next (a large image's per-symbol state is not kept twice).
    """
    device = next(net.parameters()).device
    spans = _spans(headers)
    for node in walk:
        prior = node.prior
        if not (torch.isfinite(prior.mean).all() and torch.isfinite(prior.std).all()):
            raise UQDMError(f"the model's prior is not finite at step {node.i + 1}; is the checkpoint broken?")
        u = _shared(headers, channels, lambda seed, shape: randomness.dither(seed, node.i, shape)).to(device)
        std, delta, u_cpu = prior.std.cpu(), node.step.delta.cpu(), u.cpu()
        models = [tables.step_model(std[span], delta, u_cpu[span], net.prior_type, ideal) for span in spans]
        del prior, std, u_cpu
        yield node, u, models
        del node, u, models


def _top(net: UQDM, headers: list[Header], channels: int) -> Tensor:
    """The shared z₁ of every image's tiles, on the model's device."""
    return _shared(headers, channels, randomness.top_latent).to(next(net.parameters()).device)


def _partial_latent(node: Node, u: Tensor, span: slice, k: Tensor) -> Tensor:
    """z_s of one image's tiles from a partly received step: μ_p + (k − u)·Δ, where `k` (flat, CPU,
    float) is `Refinement.fill`'s: u + E[x | interval] for the symbols not yet exact."""
    mean = node.prior.mean[span]
    return dequantize(k.view(mean.shape).to(mean.device, mean.dtype), u[span], mean, node.step.delta)


def _lossless_model(net: UQDM, z_0: Tensor) -> tables.LosslessModel:
    gamma_0 = net.gamma_at(0.0)
    alpha_0, _ = alpha_sigma(gamma_0)
    return tables.lossless_model(z_0.cpu(), alpha_0.cpu(), gamma_0.cpu())


def _show(net: UQDM, header: Header, method: str, i: int, z_t: Tensor, prior: Prior | None,
          blend: bool = True) -> Tensor:
    """The picture a decoder shows holding one image's tiles z_t after i steps (`ancestral` draws
    from the generator of (seed, "ancestral", i)). With `blend`, every network call of the
    reconstruction blends overlapping windows (`windows`), so the coding `prior` is not reused."""
    gen = randomness.generator(header.seed, "ancestral", i, z_t.device)
    with net.network.arranged(_layouts([header]), blend=blend):
        picture = net.reconstruct(z_t, i, method, None if blend else prior, gen)
    return from_tiles(picture.cpu(), header.height, header.width)


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
def compress(model: UQDM, images: list[Tensor], steps: int | None = None, seed: int = 0,
             tile: int = 64, batch_tiles: int = BATCH_TILES,
             on_chunk: Callable[[int], None] | None = None, layers: int = DEFAULT_LAYERS,
             lost: Sequence[Sequence[str]] | None = None, mode: str = DEFAULT_MODE,
             grid_kind: str = DEFAULT_GRID, on_windows: Callable[[int, int], None] | None = None) -> list[bytes]:
    """Compress uint8 C×H×W images (any sizes) into `.uqdm` files, coding all tiles together.

    `steps` = number of chunks: K ≤ T gives a lossy file of K steps; None (or T + 1) adds the
    lossless chunk. Each step's chunk is `layers` quality layers. `on_chunk(c)` is called once the
    first c chunks of every file are coded (c = 0: set-up done, nothing coded yet); `on_windows(done,
    total)` as the network runs the windows of a pass (`windows.Windowed`, all images together: one
    pass per step). `lost[n]` names what image n lacks of the file it was read from
    (`uqdm.images.load_image_and_losses`), recorded in its header. `mode`: "fast" or "portable"
    (see the module docstring); `grid_kind`: "shifted" (the network's windows move by half a tile
    every other step) or "fixed" (see `windows`). Returns one file's bytes per image.
    """
    return [e.data for e in _encode(model, images, [seed] * len(images), steps, None, tile, batch_tiles, on_chunk,
                                    layers, mode, grid_kind, True, lost, on_windows)]


@torch.inference_mode()
def compress_progressive(model: UQDM, images: list[Tensor], seeds: Sequence[int], methods: Sequence[str],
                         tile: int = 64, batch_tiles: int = BATCH_TILES,
                         on_chunk: Callable[[int], None] | None = None, layers: int = DEFAULT_LAYERS,
                         mode: str = DEFAULT_MODE, grid_kind: str = DEFAULT_GRID,
                         blend: bool = True) -> list[Encoded]:
    """Lossless `.uqdm` files of uint8 C×H×W images (image n with seed `seeds[n]`), and from the
    same walk what decoding each file shows at every truncation point for each of `methods`
    (`decompress(..., blend=blend)`), and the ideal bits of each layer. `on_chunk`, `mode` and
    `grid_kind` as in `compress`; the pictures and ideal bits are made after the last chunk is
    coded (they are no part of the encoder's time).
    """
    for method in methods:
        _check_method(method)
    return _encode(model, images, seeds, None, methods, tile, batch_tiles, on_chunk, layers, mode, grid_kind, blend)


def _encode(model: UQDM, images: list[Tensor], seeds: Sequence[int], steps: int | None,
            methods: Sequence[str] | None, tile: int, batch_tiles: int,
            on_chunk: Callable[[int], None] | None, layers: int, mode: str, grid_kind: str, blend: bool,
            lost: Sequence[Sequence[str]] | None = None,
            on_windows: Callable[[int, int], None] | None = None) -> list[Encoded]:
    """The encoder: one walk over every image's tiles; with `methods` (not None) also the pictures
    (blended or not) and ideal bits of `Encoded`."""
    fp = fingerprint(model)
    tiles = sum(math.prod(grid(im.shape[-2], im.shape[-1], tile)) for im in images)
    net = codec_model(model, batch_tiles, mode, tile, grid_kind, tiles)
    net.network.on_windows = on_windows
    channels = _check_images(images, net.network.n_channels)
    T = net.n_timesteps
    n_chunks = _n_chunks(steps, T)
    check = bytes(CHECK_BYTES) if mode == "fast" else b""  # set from the first network call below
    try:
        lost = [()] * len(images) if lost is None else lost
        headers = [Header(fp, im.shape[1], im.shape[2], tile, T, layers, seed, tuple(gone), mode=mode, check=check,
                          grid=grid_kind)
                   for im, seed, gone in zip(images, seeds, lost, strict=True)]
    except ValueError as e:
        raise UQDMError(f"cannot compress: {e}") from None
    spans = _spans(headers)
    device = next(net.parameters()).device
    x_raw = torch.cat([to_tiles(im, tile) for im in images])
    chunks: list[list[bytes]] = [[] for _ in images]
    coded = on_chunk or (lambda c: None)
    coded(0)
    walk = Walk(net, _top(net, headers, channels), stop=min(n_chunks, T))
    steps_taken = []  # per step: the node, u and each image's layer bits and partial indices, for the report
    with net.network.arranged(_layouts(headers)):  # the coding windows of every image
        for node, u, models in _coded_steps(net, walk, headers, channels, ideal=methods is not None):
            x = to_centered(x_raw).to(device, torch.float64)
            k = quantization_index(net.posterior_mean(x, node.z_t, node.step), node.prior.mean, node.step.delta, u)
            del x
            k_cpu = k.cpu()  # integers, float64 (`Refinement.values` takes them as they are)
            shown = []  # per image: each layer's ideal bits, and the indices after layers 1 … L − 1
            for n, span in enumerate(spans):
                k_flat, refinement, bits, fills = k_cpu[span].flatten(), Refinement(models[n], layers), [], []
                for l in range(1, layers + 1):
                    values = refinement.values(k_flat)
                    chunks[n].append(coder.encode(refinement.layer(), values))
                    bits.append(refinement.receive(values, bits=methods is not None))
                    if methods is not None and l < layers:
                        fills.append(refinement.fill())
                shown.append((bits, fills))
            node.quantize(k, u)
            if methods is not None:
                steps_taken.append((node, u, shown))
            coded(node.i + 1)
            del node, u, models, k, k_cpu, k_flat, refinement, shown
        z = walk.z
        if n_chunks > T:
            for n, span in enumerate(spans):
                chunks[n].append(coder.encode(_lossless_model(net, z[span]), x_raw[span].flatten().long()))
            coded(T + 1)
        if mode == "fast":
            if not net.network.network.first:  # no step coded: the decoder still calls the network at z₁
                net.prior(_top(net, headers, channels), net.step(0))
            headers = [replace(h, check=net.network.network.check_value(span)) for h, span in zip(headers, spans)]
    out = [Encoded(pack(h, c), {m: [] for m in methods or ()}, []) for h, c in zip(headers, chunks)]
    if methods is not None:  # what the decoder of each (lossless) file shows, and its ideal bits
        for n, (e, h, span, image) in enumerate(zip(out, headers, spans, images)):
            for node, u, shown in steps_taken:
                bits, fills = shown[n]
                e.ideal_bits += bits
                latents = [_partial_latent(node, u, span, k) for k in fills]  # after layers 1 … L − 1
                for m in methods:
                    e.points[m].append(_show(net, h, m, node.i, node.z_t[span], node.prior[span], blend))
                    e.points[m] += [_show(net, h, m, node.i + 1, z_s, None, blend) for z_s in latents]
            e.ideal_bits.append(_lossless_ideal_bits(net, x_raw[span], z[span]))
            for m in methods:
                e.points[m] += [_show(net, h, m, T, z[span], None, blend), image]
    return out


def _check_method(method: str) -> None:
    if method not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction {method!r}; choose one of {RECONSTRUCTIONS}")


@torch.inference_mode()
def decompress(model: UQDM, data: bytes, steps: int | None = None, method: str = "denoise",
               all_points: bool = False, batch_tiles: int = BATCH_TILES,
               on_point: Callable[[int, Tensor], None] | None = None,
               on_chunk: Callable[[int], None] | None = None,
               on_windows: Callable[[int, int], None] | None = None, blend: bool = True, ideal: bool = True) -> Decoded:
    """Decode a `.uqdm` file, or a prefix of one, to its last (or its `steps`-th) truncation point.

    A prefix ending inside a layer decodes its complete layers (with a warning); one ending after
    some layers of a step decodes them, takes each symbol's conditional mean within its known interval and
    reconstructs from there (`_partial_latent`). `method` is the reconstruction of the lossy points
    ("denoise", "ancestral" or "flow_based"); `all_points` also returns the picture at every point
    (after every layer) up to there. `on_point(p, picture)` is called as soon as the picture of
    each point p (p layers) up to there is shown (progressive display; every point's picture is
    made, as with `all_points`). `on_chunk(c)` and `on_windows(done, total)` report progress as in
    `compress` (c chunks decoded; `done` of the `total` windows of a network pass run; each picture
    is passes of its own). `blend`: the pictures of lossy points blend overlapping windows
    (`windows`); without it, each pixel comes from one tile-sized window, as the coding does.
    `ideal`: also each layer's ideal bits (`Decoded.ideal_bits`; without, empty: they take a pass
    over the lossless step's 256-way likelihood and per-symbol state).

    Raises:
        UQDMError: a corrupt file, a file of another model, or `steps` beyond the file's chunks.
    """
    _check_method(method)
    container = parse(data)
    header = container.header
    fp = fingerprint(model)
    if header.fingerprint != fp:
        raise UQDMError(f"this file was made with a different model (fingerprint {header.fingerprint.hex()}, "
                        f"this model's is {fp.hex()}); pass the checkpoint it was compressed with")
    net = codec_model(model, batch_tiles, header.mode, header.tile, header.grid,
                      math.prod(grid(header.height, header.width, header.tile)))
    net.network.on_windows = on_windows
    T = net.n_timesteps
    if header.n_timesteps != T:
        raise UQDMError(f"the file's header names T = {header.n_timesteps} steps but the model has {T}; "
                        "is the file corrupt?")
    L, held = header.layers, len(container.layers)
    n_records = held if steps is None else header.records_after(_n_chunks(steps, T))
    if n_records > held:
        raise UQDMError(f"the file holds {held} complete layers; cannot decode {steps} chunks of {L} layers")
    channels = net.network.n_channels
    layer_bits: list[float] = []
    pictures: list[Tensor] = []

    def shown(image: Tensor) -> None:
        pictures.append(image)
        if on_point is not None:
            on_point(len(pictures) - 1, image)

    every_point = all_points or on_point is not None
    decoded = on_chunk or (lambda c: None)
    decoded(0)
    steps_run = min(-(-n_records // L), T)  # whole steps, and a partly received one
    walk = Walk(net, _top(net, [header], channels), stop=steps_run)
    everything = slice(None)
    with net.network.arranged(_layouts([header])):  # the coding windows
        if steps_run == 0 and header.mode == "fast":  # the encoder's first network call, at z₁
            net.prior(walk.z, net.step(0))
            _verify(net, header)
        for node, u, (step_model,) in _coded_steps(net, walk, [header], channels, ideal):
            if node.i == 0:
                _verify(net, header)
            if every_point:
                shown(_show(net, header, method, node.i, node.z_t, node.prior, blend))
            received = min(n_records - node.i * L, L)
            refinement = Refinement(step_model, L)
            for l in range(1, received + 1):
                record = node.i * L + l
                values = coder.decode(refinement.layer(), container.layers[record - 1], header.describe(record))
                bits = refinement.receive(values, bits=ideal)
                if ideal:
                    layer_bits.append(bits)
                if every_point and l < (received if received < L else L):
                    shown(_show(net, header, method, node.i + 1, _partial_latent(node, u, everything, refinement.fill()),
                                None, blend))
            k = refinement.fill()
            node.quantize(k.view(node.z_t.shape).to(node.z_t.device, node.z_t.dtype), u)
            decoded(node.i + 1)
            del node, u, step_model, refinement, k
    z = walk.z
    if n_records < header.n_records or every_point:
        shown(_show(net, header, method, steps_run, z, None, blend))
    if n_records == header.n_records:
        model_0 = _lossless_model(net, z)
        x_raw = coder.decode(model_0, container.layers[-1], header.describe(n_records)).view(z.shape)
        if ideal:
            layer_bits.append(_lossless_ideal_bits(net, x_raw, z))
        decoded(T + 1)
        shown(from_tiles(x_raw.to(torch.uint8), header.height, header.width))
    return Decoded(header, pictures[-1], pictures if all_points else None, layer_bits)


def _lossless_ideal_bits(net: UQDM, x_raw: Tensor, z_0: Tensor) -> float:
    """−log₂ p(x_raw | z_0) summed, in slices (the 256-way table of a large image is gigabytes)."""
    x, z = x_raw.flatten().to(z_0.device), z_0.flatten()
    nats = sum(-net.log_likelihood(xs, zs).sum().item() for xs, zs in zip(x.split(IDEAL_SLICE), z.split(IDEAL_SLICE)))
    return nats / math.log(2)


def layer_ideal_bits(model: UQDM, data: bytes) -> list[float]:
    """Per layer, −log₂ of its coded symbols' probabilities under the unquantised model."""
    return decompress(model, data).ideal_bits
