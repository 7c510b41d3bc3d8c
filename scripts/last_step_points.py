"""What the decoder could show after some layers of the last lossy step (z₀), estimator by estimator.

    OMP_NUM_THREADS=1 python scripts/last_step_points.py --ckpt tiny.ckpt \
        --kodak ../shared/data/kodak --images 8 --out eval/last-step

Walks the codec (portable, image n of the first N Kodak images at 64×64 with seed n) to step T,
codes step T's symbols in L layers (`uqdm.codec.layers.Refinement`, the file's plan) and after
each layer makes the picture (uint8 unless said) by:

- "argmax of the fill (the codec)": z₀ = μ_p + (E[k | cell] − u)·Δ, then argmax p(x | z₀);
- "fill, unrounded": z₀/α₀ of the fill itself in levels (floats: a bound, not a picture);
- "fill, prior ×f": the conditional mean under the step's table with its scale times f;
- "lossless model": the integer nearest to E[x | cell] = Σ_k P(k | cell)·E_{p(x | z₀(k))}[x];
- "pixel posterior": the pixel values x whose encoder index k(x) = round((μ_q(x) − μ_p)/Δ + u)
  lies in the known cell (computable at the decoder from z_t, μ_p, u, Δ; the true pixel always
  does), weighted by the prior's base density g at μ_q(x) − μ_p; the integer nearest to their
  mean, the picture of least expected squared error under the model (g ⊛ U instead of g: the
  same within 0.01 dB); "unrounded": that mean itself (floats);
- "network, nearest in cell": x̂ of the score network at γ' = log(the fill's mean error
  variance), z' = α'·z₀/α₀, then the pixel value in the cell nearest to it (the tiny model was
  trained at the T grid times only; at γ_t of step T instead it is 4–17 dB worse);
- "cross-channel": the step's table times N(μ', σ'²)/N(0, σ²), where N(μ', σ'²) is a symbol's
  residual given the other channels' fills of the same pixel, the standardised residuals taken as
  jointly Gaussian with a 3×3 correlation estimated from the fills ("oracle C": from the true
  residuals); then the fill's argmax, or the pixel posterior with that factor.

Prints, per estimator, each layer point's PSNR and its distance (dB) to the line joining step
T − 1's point and step T's point (the codec's: argmax of the exact z₀) at the layer's share of
the step's ideal bits; the last column is step T's own point.

Measured (released tiny weights, 8 images, L = 4; distances at the three interior points, then the
end point's change): the codec −0.72, −1.76, −2.29 dB; fill unrounded −0.48, −1.31, −1.57; prior
×0.8 / ×1.25 within 0.02 dB of the codec; lossless model +0.01…+0.03 dB over the codec; pixel posterior
−0.70, −1.67, −2.15 (end +0.71), unrounded −0.44, −1.16, −1.06; network, nearest in cell −1.74,
−1.86, −2.51; cross-channel fill −0.65, −1.58, −2.10; cross-channel pixel posterior −0.62, −1.45,
−1.87 (end +0.96); with the oracle C −0.40, −1.27, −1.81. No estimator from the file's cells
reaches the line: the step's interior points lack bits, not a better estimate.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from uqdm.codec.codec import _coded_steps, _layouts, _show, _top, codec_model
from uqdm.codec.container import Header
from uqdm.codec.exact import det_cdf
from uqdm.codec.layers import Refinement
from uqdm.codec.tables import scale_value
from uqdm.diffusion import to_centered
from uqdm.distributions import base_distribution
from uqdm.evaluation.quality import psnr_per_image
from uqdm.images import box_resize_center_crop, load_image
from uqdm.schedules import alpha_sigma
from uqdm.walk import Walk, dequantize, quantization_index
from uqdm.weights import load_model

LEVELS = torch.arange(256)


def cell_tables(refinement: Refinement, factor: float = 1.0):
    """Per group of the step: (group, positions x = k − u of its entries, the table (scale times
    `factor`) zeroed outside each symbol's known cell, whether the symbol is exact)."""
    model = refinement.model
    for g in refinement.groups:
        lo, hi = refinement.lo[g.index, None], refinement.hi[g.index, None]
        e = torch.arange(2 * g.r + 1)[None, :]
        x = g.x()
        a = scale_value(model.j[g.index])[:, None] * factor
        cdf = det_cdf(model.prior_type, (x[:, 1:] - 0.5) / a)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf, torch.ones_like(cdf[:, :1])], 1)
        yield g, x, torch.diff(cdf, dim=1) * ((e >= lo) & (e <= hi)), refinement.stage[g.index] == g.stages


def reweighted_fill(refinement: Refinement, factor: float = 1.0, log_weight=None) -> torch.Tensor:
    """u + E[x | cell] under the table (scale times `factor`, times exp(log_weight(rows, x))); k where exact."""
    k = refinement.fill()
    for g, x, P, exact in cell_tables(refinement, factor):
        if log_weight is not None:
            log_w = torch.where(P > 0, log_weight(g.index, x), -torch.inf)
            P = P * torch.exp(log_w - log_w.max(1, keepdim=True).values)
        mean = (P * x).sum(1) / P.sum(1).clamp_min(1e-300)
        k[g.index] = torch.where(exact, k[g.index], mean + refinement.model.u[g.index])
    return k


def cell_variance(refinement: Refinement) -> torch.Tensor:
    """Var[k − u | cell] under the step's table (0 for exact symbols), in Δ²."""
    var = torch.zeros(len(refinement.model), dtype=torch.float64)
    for g, x, P, exact in cell_tables(refinement):
        P = P / P.sum(1, keepdim=True).clamp_min(1e-300)
        m = (P * x).sum(1, keepdim=True)
        var[g.index] = torch.where(exact, 0.0, (P * (x - m) ** 2).sum(1))
    return var


def to_levels(z_0: torch.Tensor, alpha_0: float) -> torch.Tensor:
    """z₀/α₀ in pixel levels (x = 2·(level + ½)/256 − 1), flat."""
    return z_0.flatten() / alpha_0 * 128 + 127.5


def lossless_mean(refinement: Refinement, node, alpha_0: float, gamma_0: float) -> torch.Tensor:
    """E[x_raw | cell] (levels, float) = Σ_k P(k | cell)·E[x_raw | z₀(k)] under p(x_raw | z₀)."""
    mu, delta = node.prior.mean.flatten().cpu(), float(node.step.delta)
    sigma = math.exp(gamma_0 / 2) * 128  # p(x_raw | z₀)'s std in levels
    offsets = torch.arange(-4, 5, dtype=torch.float64)

    def mean_level(y):
        c = (torch.round(y)[..., None] + offsets).clamp(0, 255)
        log_w = -0.5 * ((y[..., None] - c) / sigma) ** 2
        w = torch.exp(log_w - log_w.max(-1, keepdim=True).values)
        return (w * c).sum(-1) / w.sum(-1)

    out = torch.empty(len(refinement.model), dtype=torch.float64)
    known = refinement.fill() - refinement.model.u
    for g, x, P, exact in cell_tables(refinement):
        y = to_levels(mu[g.index, None] + x * delta, alpha_0).view(x.shape)
        m = (P * mean_level(y)).sum(1) / P.sum(1).clamp_min(1e-300)
        out[g.index] = torch.where(exact, mean_level(to_levels(mu[g.index] + known[g.index] * delta, alpha_0)), m)
    return out


def offsets_by_level(node) -> torch.Tensor:
    """(μ_q(x) − μ_p)/Δ of every symbol (rows) at every pixel value x (columns): the encoder's
    x = k − u before rounding, μ_q(x) = α_s·((1 − e)/α_t·z_t + e·x)."""
    st = node.step
    z_t, mu = node.z_t.flatten().cpu()[:, None], node.prior.mean.flatten().cpu()[:, None]
    mu_q = st.alpha_s * ((1 - st.e) / st.alpha_t * z_t + st.e * to_centered(LEVELS).double()[None, :])
    return (mu_q - mu) / st.delta


def candidates(refinement: Refinement, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(symbols × 256) whether pixel value x's encoder index k(x) = round(offset + u) lies in the cell."""
    model = refinement.model
    k = torch.round(offsets + u.flatten().cpu()[:, None]).long()
    R = model.ranges[:, None]
    exact = (refinement.stage == refinement.exact)[:, None]
    known = (refinement.lo - model.ranges + refinement.excess)[:, None]
    entry = k.clamp(-R, R) + R
    return torch.where(exact, k == known, (entry >= refinement.lo[:, None]) & (entry <= refinement.hi[:, None]))


def pixel_posterior(inside: torch.Tensor, offsets: torch.Tensor, model, cross=None) -> torch.Tensor:
    """E[x_raw | cell] (float levels) over the pixel values `inside` the cell, weighted by the
    prior's base density g at their offsets (in Δ), times N(μ', σ'²)/N(0, σ²) with `cross`."""
    std = model.std.double()[:, None]
    g = base_distribution(model.prior_type, std)
    a = offsets.abs() / g.scale
    log_w = -a - 2 * torch.log1p(torch.exp(-a)) if model.prior_type == "logistic" else -0.5 * a**2
    if cross is not None:
        mu_c, var_c = (t[:, None] for t in cross)
        log_w = log_w - (offsets - mu_c) ** 2 / (2 * var_c) + offsets**2 / (2 * std**2)
    log_w = torch.where(inside, log_w, -torch.inf)
    w = torch.exp(log_w - log_w.max(1, keepdim=True).values)
    return (w * LEVELS.double()).sum(1) / w.sum(1)


def nearest_candidate(inside: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    d = (LEVELS.double()[None, :] - levels[:, None]).abs()
    return torch.argmin(torch.where(inside, d, torch.inf), 1).double()


def network_estimate(score, y: torch.Tensor, noise_var: float) -> torch.Tensor:
    """x̂ from y = x + n, Var n = noise_var (x units): the network at γ' = log(noise_var), z' = α'·y."""
    gamma = torch.tensor(math.log(noise_var), dtype=torch.float64)
    alpha, sigma = alpha_sigma(gamma)
    z = alpha * y
    eps, _ = score(z, gamma)
    return (z - sigma * eps) / alpha


def cross_channel_prior(refinement: Refinement, channels: int, truth: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ', σ'²) of each symbol's x = k − u (in Δ) given the other channels of its pixel: the
    standardised residuals x/σ (σ: the prior's std in Δ) jointly Gaussian across channels with a
    correlation C estimated from the fills (with `truth`, the true x: an oracle), the other
    channels' fills observed with their cells' variance as noise."""
    model = refinement.model
    sigma = model.std.double()
    o = ((refinement.fill() - model.u) / sigma).view(channels, -1)
    noise = (cell_variance(refinement) / sigma**2).view(channels, -1)
    if truth is None:
        cov = o @ o.T / o.shape[1] + torch.diag(noise.mean(1))
    else:
        t = (truth / sigma).view(channels, -1)
        cov = t @ t.T / t.shape[1]
    d = cov.diagonal().sqrt()
    C = cov / d[:, None] / d[None, :]
    mu, var = torch.zeros_like(o), torch.ones_like(o)
    for c in range(channels):
        others = [b for b in range(channels) if b != c]
        S = C[others][:, others][None] + torch.diag_embed(noise[others].T)
        w = torch.linalg.solve(S, C[others, c][None].expand(o.shape[1], -1))
        mu[c] = (w * o[others].T).sum(1)
        var[c] = (1 - (w * C[others, c][None]).sum(1)).clamp_min(1e-3)
    return mu.flatten() * sigma, var.flatten() * sigma**2


@torch.inference_mode()
def run_image(net, image: torch.Tensor, seed: int, layers: int, factors: list[float]) -> dict:
    header = Header(bytes(8), image.shape[1], image.shape[2], image.shape[1], net.n_timesteps, layers, seed)
    with net.network.arranged(_layouts([header])):
        return _run_image(net, header, image, layers, factors)


def _run_image(net, header: Header, image: torch.Tensor, layers: int, factors: list[float]) -> dict:
    x_img, truth, channels = to_centered(image[None]).double(), image.double(), image.shape[0]
    psnr = lambda picture: psnr_per_image(picture[None], image[None]).item()
    fpsnr = lambda levels: (10 * torch.log10(255**2 / ((levels.view(image.shape) - truth) ** 2).mean())).item()
    gamma_0 = net.gamma_at(0.0)
    alpha_0 = float(alpha_sigma(gamma_0)[0])
    T = net.n_timesteps
    walk = Walk(net, _top(net, [header], channels))
    steps, curves = [], {}
    for node, u, (model,) in _coded_steps(net, walk, [header], channels):
        k = quantization_index(net.posterior_mean(x_img, node.z_t, node.step), node.prior.mean, node.step.delta, u)
        steps.append(psnr(_show(net, header, "denoise", node.i, node.z_t, node.prior)))
        if node.i == T - 1:
            refinement, bits = Refinement(model, layers), []
            offsets = offsets_by_level(node)
            x_true = ((net.posterior_mean(x_img, node.z_t, node.step) - node.prior.mean) / node.step.delta).flatten()
            shown = lambda k_fill: psnr(_show(net, header, "denoise", T, dequantize(
                k_fill.view(k.shape), u, node.prior.mean, node.step.delta), None))
            for _ in range(layers):
                bits.append(refinement.receive(refinement.values(k.flatten())))
                fill = refinement.fill()
                z_0 = dequantize(fill.view(k.shape), u, node.prior.mean, node.step.delta)
                inside = candidates(refinement, offsets, u)
                assert inside[torch.arange(len(inside)), image.flatten().long()].all()  # k(x) is the encoder's
                posterior = pixel_posterior(inside, offsets, model)
                est = {"argmax of the fill (the codec)": shown(fill),
                       "fill, unrounded (floats)": fpsnr(to_levels(z_0, alpha_0))}
                est |= {f"fill, prior ×{f}": shown(reweighted_fill(refinement, f)) for f in factors}
                est["lossless model"] = fpsnr(torch.round(lossless_mean(refinement, node, alpha_0, float(gamma_0))))
                est["pixel posterior"] = fpsnr(torch.round(posterior))
                est["pixel posterior, unrounded (floats)"] = fpsnr(posterior)
                noise = float((cell_variance(refinement).mean() + 1 / 12) * (node.step.delta / alpha_0) ** 2)
                x_hat = to_levels(network_estimate(net.network.network.network, z_0 / alpha_0, noise), 1.0)
                est["network, nearest in cell"] = fpsnr(nearest_candidate(inside, x_hat))
                for name, oracle in (("", None), (", oracle C", x_true)):
                    mu_c, var_c = cross_channel_prior(refinement, channels, oracle)
                    std = model.std.double()
                    log_weight = lambda rows, x: (-(x - mu_c[rows, None]) ** 2 / (2 * var_c[rows, None])
                                                  + x**2 / (2 * std[rows, None] ** 2))
                    est[f"cross-channel fill{name}"] = shown(reweighted_fill(refinement, 1.0, log_weight))
                    est[f"cross-channel pixel posterior{name}"] = fpsnr(
                        torch.round(pixel_posterior(inside, offsets, model, (mu_c, var_c))))
                for name, q in est.items():
                    curves.setdefault(name, []).append(q)
        node.quantize(k, u)
    steps.append(psnr(_show(net, header, "denoise", T, walk.z, None)))
    return {"steps": steps, "bits": bits, "curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--kodak", required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--factors", type=float, nargs="*", default=[0.8, 1.25])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = codec_model(load_model(args.ckpt), mode="portable")
    paths = sorted(Path(args.kodak).glob("kodim*.png"))[: args.images]
    results = []
    for n, p in enumerate(paths):
        results.append(run_image(net, box_resize_center_crop(load_image(p), 64), n, args.layers, args.factors))
        print(f"image {n} done", flush=True)
    n, L = len(results), args.layers
    T = len(results[0]["steps"]) - 1
    start = sum(r["steps"][T - 1] for r in results) / n
    end = sum(r["steps"][T] for r in results) / n
    summary = {"step_psnr": [start, end], "curves": {}}
    print(f"step {T - 1} point {start:.2f} dB, step {T} point {end:.2f} dB (argmax of the exact z₀)")
    for name in results[0]["curves"]:
        rows = []
        for l in range(L):
            f = sum(sum(r["bits"][: l + 1]) / sum(r["bits"]) for r in results) / n
            q = sum(r["curves"][name][l] for r in results) / n
            rows.append({"layer": l + 1, "share_of_bits": f, "psnr": q, "vs_chord": q - (start + f * (end - start))})
        summary["curves"][name] = rows
        print(f"{name}: " + "; ".join(f"{r['psnr']:.2f} dB ({r['vs_chord']:+.2f})" for r in rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "last-step.json").write_text(json.dumps({"summary": summary, "images": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
