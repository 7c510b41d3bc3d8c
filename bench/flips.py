"""Measurement for a fast exact codec: how far float32 network outputs stray, what they flip, and
what a margin scheme costs (the released tiny weights, the Kodak 64×64 crops, T = 4).

The decoder's tables depend on the network only through (docs/format.md):
  j = round(16·log₂ a), a = scale(g)/Δ   (the prior's scale index, every element of every step)
  Y = round(z₀/α₀·2¹²)                    (the lossless grid; z₀ = μ_p + (k − u)·Δ of the last step)
μ_p itself never decides a table (k is sent relative to it), but it moves the latents, and so the
next step's network input and, at the end, z₀.

What this script measures, each on the same latents (the float64 reference trajectory):
  outputs   max and quantiles of |ε̂_A − ε̂_B| and |L_A − L_B| (L = 16·log₂ a before rounding) for
            float32 networks at batch 32 / batch 1 and 1 / 2 threads, and against float64;
  naive     the flip rate of j (per step symbol) and of Y (per pixel) when a float32 decoder
            (batch 1, 2 threads) follows a float32 encoder (batch 32, 1 thread), and the pixels
            of the denoise pictures that differ between them;
  rate      the ideal bits when the encoder's ε̂ is rounded to a grid of step q (so that, given the
            same rounded ε̂, both sides compute every latent identically in float64), against the
            float64 reference;
  margin    for each q and margin δ, blocks of B elements and K grid shifts: the share of blocks in
            which no shift keeps every element ≥ δ from a bin edge, the side information (the
            entropy of the chosen shift index, per element), against the plain alternative of
            flagging every element within 2δ of an edge.

Run: `PYTHONPATH=. python bench/flips.py [--images 32] [--out bench/flips.json]` (37 minutes
for 32 images on 2 heavily shared cores). The figures are in docs/fast-codec.md.
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import RELEASED, kodak64  # noqa: E402  (bench/codec.py: the same images as make bench)

from uqdm.codec import randomness, tables  # noqa: E402
from uqdm.codec.tiling import to_tiles  # noqa: E402
from uqdm.diffusion import to_centered  # noqa: E402
from uqdm.distributions import base_distribution, log_prob_uniform_convolved  # noqa: E402
from uqdm.released import load_released  # noqa: E402
from uqdm.schedules import alpha_sigma  # noqa: E402
from uqdm.walk import quantization_index  # noqa: E402

GRIDS = (2.0**-6, 2.0**-8, 2.0**-10)  # steps q of the ε̂ grid
BLOCKS = (64, 256, 1024, 4096)
SHIFTS = (2, 4, 8, 16)
MARGIN_FACTORS = (4, 16, 64)
PAIRS = (("f32_b1_t1", "f32_b32_t1"), ("f32_b32_t2", "f32_b32_t1"), ("f32_b1_t2", "f32_b32_t1"),
         ("f64_b1_t2", "f64_b4_t1"), ("f32_b32_t1", "f64_b4_t1"))  # δ = factor × the largest float32 difference observed


class Outputs(nn.Module):
    """The network run in `dtype`, `batch` samples per call, on `threads` threads; outputs float64,
    ε̂ optionally rounded to a grid of step `q` (shift 0)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype, batch: int, threads: int, q: float | None = None):
        super().__init__()
        self.network = copy.deepcopy(network).to(dtype).eval()
        self.dtype, self.batch, self.threads, self.q = dtype, batch, threads, q
        self.n_channels = network.n_channels

    def forward(self, z, gamma_t):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            outs = [self.network(part.to(self.dtype), gamma_t.to(self.dtype)) for part in z.split(self.batch)]
        finally:
            torch.set_num_threads(before)
        eps = torch.cat([o[0] for o in outs]).double()
        factor = torch.cat([o[1] for o in outs]).double()
        if self.q is not None:
            eps = torch.round(eps / self.q) * self.q
        return eps, factor


def released_model():
    model, _, _ = load_released(RELEASED)
    return model.double().eval()


def with_network(model, outputs: Outputs):
    m = copy.copy(model)
    m._modules = {**model._modules, "network": outputs}  # a shallow copy shares the module dict
    return m


def scale_level(model, prior, st) -> torch.Tensor:
    """L = 16·log₂(scale(g)/Δ): the prior's scale index before rounding."""
    scale = base_distribution(model.prior_type, prior.std).scale / st.delta
    return tables.SCALE_STEPS * torch.log2(scale)


def descend(model, x_raw: torch.Tensor, seed: int = 0, ks: list | None = None) -> dict:
    """Encode (ks None) or follow the given ks; record per step z_t, ε̂-derived quantities, j, k, bits."""
    x = to_centered(x_raw).double()
    shape = x.shape
    z = randomness.top_latent(seed, shape)
    rec = {"z": [], "L": [], "xhat": [], "k": [], "step_bits": []}
    for i in range(model.n_timesteps):
        st = model.step(i)
        prior = model.prior(z, st)
        u = randomness.dither(seed, i, shape)
        if ks is None:
            k = quantization_index(model.posterior_mean(x, z, st), prior.mean, st.delta, u)
        else:
            k = ks[i]
        rec["z"].append(z)
        rec["L"].append(scale_level(model, prior, st))
        rec["xhat"].append(prior.x_hat)
        rec["k"].append(k)
        rec["step_bits"].append(tables.ideal_step_bits(prior.std, st.delta, u, k, model.prior_type))
        z = prior.mean + (k - u) * st.delta
    alpha_0, _ = alpha_sigma(model.gamma_at(0.0))
    rec["y"] = z / alpha_0
    rec["lossless_bits"] = float(-model.log_likelihood(x_raw, z).sum()) / math.log(2)
    rec["bits"] = sum(rec["step_bits"]) + rec["lossless_bits"]
    return rec


GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(16)


def expected_step_bits(model, ref: dict, x: torch.Tensor, outputs: Outputs) -> float:
    """Σ over steps of E_{z_s ~ q}[−log₂(p(z_s)·Δ)] (= KL(q‖p)/ln 2 + const) on the reference
    latents, by 16-point Gauss–Legendre over the posterior box: the rate without sampling noise."""
    nodes, weights = (torch.tensor(a, dtype=torch.float64) for a in GAUSS_LEGENDRE)
    m = with_network(model, outputs)
    total = 0.0
    for i in range(model.n_timesteps):
        st = model.step(i)
        prior = m.prior(ref["z"][i], st)
        mu_q = model.posterior_mean(x, ref["z"][i], st)
        g = model.base(prior)
        for node, w in zip(nodes, weights):
            z_s = mu_q + node * st.delta / 2
            total += float(-(w / 2) * log_prob_uniform_convolved(g, z_s - prior.mean, st.delta).sum())
    return total / math.log(2)


def quantiles(d: torch.Tensor) -> dict:
    d = d.abs().flatten().numpy()
    return {"max": float(d.max()), "q99.99": float(np.quantile(d, 0.9999)), "q99": float(np.quantile(d, 0.99)),
            "median": float(np.median(d))}


@torch.inference_mode()
def same_input_differences(model, ref: dict, variants: dict) -> dict:
    """On the reference latents, each variant's ε̂ and L against the first float32 one and float64."""
    per = {name: {"eps": [], "L": [], "xhat": []} for name in variants}
    for i in range(model.n_timesteps):
        st = model.step(i)
        for name, out in variants.items():
            prior = with_network(model, out).prior(ref["z"][i], st)
            per[name]["eps"].append((ref["z"][i] - prior.x_hat_unclipped * st.alpha_t) / st.sigma_t)
            per[name]["L"].append(scale_level(model, prior, st))
            per[name]["xhat"].append(prior.x_hat)
    result = {}
    for name, base in PAIRS:
        r = {}
        for q in ("eps", "L"):
            r[q] = quantiles(torch.stack([a - b for a, b in zip(per[name][q], per[base][q])]))
        # denoise pictures at points 0..T-1 from each side's own x̂
        pix = [(model.decode_argmax(a) != model.decode_argmax(b)).double().mean().item()
               for a, b in zip(per[name]["xhat"], per[base]["xhat"])]
        r["denoise_pixel_differ_rate_by_point"] = pix
        r["j_flip_rate_same_input"] = float(torch.stack([
            (torch.round(a) != torch.round(b)).double().mean() for a, b in zip(per[name]["L"], per[base]["L"])]).mean())
        result[f"{name}_vs_{base}"] = r
    return result, per["f32_b32_t1"]


def margin_figures(values: np.ndarray, delta: float, blocks=BLOCKS, shifts=SHIFTS) -> dict:
    """values in grid units (v/q); δ in grid units. For every block size B and shift count K:
    the share of blocks with no fitting shift and the side information in bits per element."""
    frac = values - np.floor(values)  # position within a unit cell; edges of shift s at s/K + ½ mod 1
    out = {}
    for B in blocks:
        n = (len(frac) // B) * B
        f = frac[:n].reshape(-1, B)
        for K in shifts:
            fits = np.empty((f.shape[0], K), dtype=bool)
            for s in range(K):
                d = np.abs(((f - s / K - 0.5) + 0.5) % 1.0 - 0.5)  # distance to the edge of shift s
                fits[:, s] = (d >= delta).all(1)
            any_fit = fits.any(1)
            first = np.where(any_fit, fits.argmax(1), K)  # K = escape
            p = np.bincount(first, minlength=K + 1) / len(first)
            entropy_bits = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
            out[f"B{B}_K{K}"] = {"no_shift_fits": float(1 - any_fit.mean()),
                                 "side_bits_per_element_fixed": math.log2(K + 1) / B,
                                 "side_bits_per_element_entropy": entropy_bits / B}
    near = float((np.abs(frac - 0.5) < 2 * delta).mean())
    flag_bits = (-near * math.log2(near) - (1 - near) * math.log2(1 - near) + near) if 0 < near < 1 else 0.0
    out["flag_within_2delta"] = {"share": near, "bits_per_element": flag_bits}
    return out


@torch.inference_mode()
def main(n_images: int, out_path: Path) -> dict:
    start = time.perf_counter()
    model = released_model()
    images = kodak64(n_images)
    x_raw = torch.cat([to_tiles(im, 64) for im in images]).long()
    net = model.network
    f64 = Outputs(net, torch.float64, 4, 1)
    ref = descend(with_network(model, f64), x_raw)
    result = {"images": n_images, "reference_bits_per_image": ref["bits"] / n_images}

    variants = {"f32_b32_t1": Outputs(net, torch.float32, 32, 1), "f32_b1_t1": Outputs(net, torch.float32, 1, 1),
                "f32_b32_t2": Outputs(net, torch.float32, 32, 2), "f32_b1_t2": Outputs(net, torch.float32, 1, 2),
                "f64_b4_t1": f64, "f64_b1_t2": Outputs(net, torch.float64, 1, 2)}
    diffs, enc32 = same_input_differences(model, ref, variants)
    result["same_input"] = diffs
    result["naive_float32"] = naive_flips(model, x_raw)

    # grid rounding of ε̂: expected rate cost on the reference latents, against float64
    x = to_centered(x_raw).double()
    base_bits = expected_step_bits(model, ref, x, f64)
    rate = {"reference_step_bits_per_image": base_bits / n_images}
    for q in GRIDS:
        bits = expected_step_bits(model, ref, x, Outputs(net, torch.float32, 32, 1, q))
        rate[f"q=2^{int(math.log2(q))}"] = {"over_reference": bits / base_bits - 1}
    bits = expected_step_bits(model, ref, x, variants["f32_b32_t1"])
    rate["float32_unrounded"] = {"over_reference": bits / base_bits - 1}
    result["rate"] = rate

    # margins: δ from the largest float32 difference on the same input (ε̂; and L for the scale index)
    f32 = [k for k in diffs if k.endswith("vs_f32_b32_t1")]
    worst_eps = max(diffs[k]["eps"]["max"] for k in f32)
    worst_L = max(diffs[k]["L"]["max"] for k in f32)
    result["worst_float32_difference"] = {"eps": worst_eps, "L": worst_L}
    eps_values = torch.cat([e.flatten() for e in enc32["eps"]]).numpy()
    L_values = torch.cat([v.flatten() for v in enc32["L"]]).numpy()
    margins = {}
    for factor in MARGIN_FACTORS:
        for q in GRIDS:
            margins[f"eps_q=2^{int(math.log2(q))}_delta={factor}x"] = {
                "delta": factor * worst_eps, **margin_figures(eps_values / q, factor * worst_eps / q)}
        margins[f"L_delta={factor}x"] = {"delta": factor * worst_L, **margin_figures(L_values, factor * worst_L)}
    result["margins"] = margins
    result["wall_s"] = time.perf_counter() - start
    out_path.write_text(json.dumps(result, indent=1))
    return result


@torch.inference_mode()
def naive_flips(model, x_raw) -> dict:
    """A float32 encoder (batch 32, 1 thread) and a float32 decoder (batch 1, 2 threads) that
    follows its k: the share of step symbols whose j differs and of pixels whose Y differs."""
    net = model.network
    enc = descend(with_network(model, Outputs(net, torch.float32, 32, 1)), x_raw)
    dec = descend(with_network(model, Outputs(net, torch.float32, 1, 2)), x_raw, ks=enc["k"])
    j_flips = [float((torch.round(a) != torch.round(b)).double().mean()) for a, b in zip(enc["L"], dec["L"])]
    grid = 1 << tables.GRID_BITS
    y_flips = float((torch.round(enc["y"] * grid) != torch.round(dec["y"] * grid)).double().mean())
    z_drift = [float((a - b).abs().max()) for a, b in zip(enc["z"], dec["z"])]
    return {"j_flip_rate_by_step": j_flips, "Y_flip_rate": y_flips, "z_drift_max_by_step": z_drift,
            "y_drift_max": float((enc["y"] - dec["y"]).abs().max())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "flips.json")
    args = parser.parse_args()
    print(json.dumps(main(args.images, args.out), indent=1))
