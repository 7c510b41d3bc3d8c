"""Quality layers by successive refinement, against format 3's layers (the experiment of issue 14).

Schemes, each with L layers per step (denoise PSNR of the picture after each layer):

- format 3: each step's symbols ordered by the prior's scale index, cut into L layers of equal
  estimated bits, each layer carrying its symbols exactly; the others at z_s = μ_p (or, "fill
  E[k] - u", at their mean under the table);
- refine, equal widths: every layer narrows every symbol's interval to a bin of one width w_l per
  layer (in Δ, centred on μ_p: b = ⌊(k − u)/w_l + ½⌋, intersected with the earlier bins), w_l chosen
  from the tables so that layer l ends near l/L of the step's expected bits; the last layer is
  k itself. A symbol known to lie in a set S is estimated as E[k − u | S] under its table ("mean")
  or as the centre of S ("centre");
- by slope: each symbol's moves along a ladder of widths (the lower convex hull of its expected
  bits and remaining variance) ranked by variance removed per bit, cut into equal shares of
  expected bits; "exact only" has no ladder (whole symbols, ranked);
- format 4: the codec's own layers (`uqdm.codec.layers.Refinement`, "by slope" with the ladder
  2^m … 1 of each table's half-width).

The layers' ideal bits add up to the one-layer bits (chain rule); they are −log₂ of the table's
probabilities (format 4: of the unquantised prior), which the range coder meets within ~0.1%.

    OMP_NUM_THREADS=1 python scripts/refinement_points.py --ckpt tiny.ckpt \
        --kodak ../shared/data/kodak --images 8 --out eval/refinement

`--code` also range-codes every "refine, equal widths" layer to measure its real bytes against the
one-layer chunk. Writes OUT/refinement.json and prints a table: for every
layer point, mean bpp, mean PSNR and the distance (dB) to the straight line joining the step points.
"""

import argparse
import json
import math
from pathlib import Path

import constriction
import numpy as np
import torch

from uqdm.codec import coder
from uqdm.codec.codec import _coded_steps, _layouts, _show, _top, codec_model
from uqdm.codec.container import Header
from uqdm.codec.layers import Refinement
from uqdm.evaluation.quality import psnr_per_image
from uqdm.images import box_resize_center_crop, load_image
from uqdm.walk import Walk, quantization_index
from uqdm.diffusion import to_centered
from uqdm.weights import load_model

WIDTH_GRID = 2.0 ** (torch.arange(0, 97) / 8)  # candidate bin widths 1 … 4096 (in Δ), 8 per octave


def fine_tables(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Every symbol's table P (n × W, padded with zeros) and the positions x = k − u of its entries
    (k = −R … R; the end entries hold the tails)."""
    n = len(model)
    r_max = int(model.ranges.max())
    width = 2 * r_max + 1
    P = torch.zeros(n, width, dtype=torch.float64)
    for seg in model.segments():
        r = -seg.low
        P[seg.index, r_max - r: r_max + r + 1] = torch.from_numpy(seg.table)
    k = torch.arange(-r_max, r_max + 1, dtype=torch.float64)
    return P / P.sum(1, keepdim=True), k[None, :] - model.u[:, None]


def bins(x: torch.Tensor, w: float) -> torch.Tensor:
    """b = ⌊x/w + ½⌋: bins of width w centred on the prior's mean (w = 1: k itself)."""
    return torch.floor(x / w + 0.5).long()


def expected_bits(P: torch.Tensor, x: torch.Tensor, w: float) -> float:
    """Σ_symbols H(bin of width w) under P, in bits."""
    b = bins(x, w)
    b = b - b.min(1, keepdim=True).values
    mass = torch.zeros(P.shape[0], int(b.max()) + 1, dtype=torch.float64).scatter_add_(1, b, P)
    return float(-(mass * torch.log2(mass.clamp_min(1e-300))).sum())


def choose_widths(P: torch.Tensor, x: torch.Tensor, shares: list[float]) -> list[float]:
    """Per share f (of the step's expected bits), the grid width whose expected bits are nearest f·total."""
    total = expected_bits(P, x, 1.0)
    hs = torch.tensor([expected_bits(P, x, float(w)) for w in WIDTH_GRID])
    return [float(WIDTH_GRID[torch.argmin((hs - f * total).abs())]) for f in shares]


def refine(P, x, s, widths, estimate: str):
    """Per layer (widths then 1): ideal bits of every symbol's bin and the estimate of x = k − u."""
    known = torch.ones_like(P, dtype=torch.bool)
    rows = torch.arange(P.shape[0])
    out = []
    for w in list(widths) + [1.0]:
        b = bins(x, w)
        inside = known & (b == b[rows, s][:, None])
        before = (P * known).sum(1)
        bits = -torch.log2((P * inside).sum(1) / before)
        known = inside
        if estimate == "mean":
            est = (P * known * x).sum(1) / (P * known).sum(1)
        else:
            lo = torch.where(known, x, math.inf).min(1).values
            hi = torch.where(known, x, -math.inf).max(1).values
            est = (lo + hi) / 2
        out.append((float(bits.sum()), est))
    return out


CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def coded_bytes(P, x, s, widths) -> list[int]:
    """Real bytes of each refinement layer (symbols whose bin is certain are not coded)."""
    known = torch.ones_like(P, dtype=torch.bool)
    rows = torch.arange(P.shape[0])
    sizes = []
    for w in list(widths) + [1.0]:
        b = bins(x, w)
        low = torch.where(known, b, 1 << 40).min(1).values
        high = torch.where(known, b, -(1 << 40)).max(1).values
        live = torch.nonzero(high > low).squeeze(1)
        enc = constriction.stream.queue.RangeEncoder()
        if len(live):
            rel = (b[live] - low[live, None]).clamp(0, None)
            width = int((high - low)[live].max()) + 1
            rel = torch.where(known[live], rel, 0)
            table = torch.zeros(len(live), width, dtype=torch.float64).scatter_add_(1, rel, P[live] * known[live])
            symbol = b[live, s[live]] - low[live]
            enc.encode(symbol.to(torch.int32).numpy(), CATEGORICAL, table.numpy())
        sizes.append(len(coder._sealed(enc)))
        known &= b == b[rows, s][:, None]
    return sizes


LADDER = (16.0, 8.0, 4.0, 2.0, 1.0)  # the widths a symbol's interval narrows through, to k itself


def ladder_cells(P, x, ladder=LADDER):
    """Per stage m = 0 … M (after the first m widths of the ladder): each table entry's cell (the
    intersection of its bins, an interval of entries), the expected residual variance D_m of x and
    the expected bits R_m of the cell, both under P."""
    n, width = P.shape
    boundary = torch.zeros(n, width - 1, dtype=torch.bool)
    cells, D, R = [torch.zeros(n, width, dtype=torch.long)], [], []
    for w in ladder:
        b = bins(x, w)
        boundary |= b[:, 1:] != b[:, :-1]
        cells.append(torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.cumsum(boundary.long(), 1)], 1))
    for c in cells:
        mass = torch.zeros(n, width, dtype=torch.float64).scatter_add_(1, c, P)
        first = torch.zeros_like(mass).scatter_add_(1, c, P * x)
        second = torch.zeros_like(mass).scatter_add_(1, c, P * x * x)
        D.append((second - first**2 / mass.clamp_min(1e-300)).sum(1).clamp_min(0))
        R.append(-(mass * torch.log2(mass.clamp_min(1e-300))).sum(1))
    return cells, torch.stack(D, 1), torch.stack(R, 1)


def lagrangian(P, x, s, shares, fill_zero=False, ladder=LADDER):
    """Each symbol's stage at layer l: argmin_m D_m + λ_l·R_m, with λ_l such that the expected bits
    of all symbols reach the share l/L of the step's; per layer the ideal bits and the estimate."""
    cells, D, R = ladder_cells(P, x, ladder)
    total = float(R[:, -1].sum())
    rows = torch.arange(P.shape[0])

    def stages(lam):
        return torch.argmin(D + lam * R, 1)

    lams = []
    for f in shares:
        lo, hi = -40.0, 40.0  # log2 λ
        for _ in range(50):
            mid = (lo + hi) / 2
            if float(R[rows, stages(2.0**mid)].sum()) > f * total:
                lo = mid
            else:
                hi = mid
        lams.append(2.0**hi)
    out, reached = [], torch.zeros(P.shape[0], dtype=torch.long)
    M = len(ladder)
    for lam in lams + [0.0]:
        m = torch.maximum(reached, stages(lam)) if lam > 0 else torch.full_like(reached, M)
        reached = m
        cell = torch.stack(cells, 0)[m, rows]  # n × width: cell ids at each symbol's stage
        inside = cell == cell[rows, s][:, None]
        mass = (P * inside).sum(1)
        bits = float(-torch.log2(mass).sum())
        est = (P * inside * x).sum(1) / mass
        if fill_zero:
            est = torch.where(m == 0, 0.0, est)
        out.append((bits, est))
    # bits so far are cumulative: make them per layer
    cum = [b for b, _ in out]
    return [(cum[0] if i == 0 else cum[i] - cum[i - 1], e) for i, (_, e) in enumerate(out)]


def split(j: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """Format version 3's layers: symbols by scale index j, largest first (ties by position), cut at
    equal shares of an integer estimate of their bits (j + 46 sixteenths for j ≥ −16, else 30
    halved per started octave below)."""
    order = torch.sort(-j, stable=True).indices
    jj = j[order]
    octaves = torch.div(-16 - jj + 15, 16, rounding_mode="floor").clamp(0, 62)
    bits = torch.where(jj >= -16, jj + 46, 30 >> octaves).clamp_min(1)
    before = torch.cumsum(bits, 0) - bits
    layer = torch.div(before * n_layers, bits.sum().clamp_min(1), rounding_mode="floor")
    return list(order.split(torch.bincount(layer, minlength=n_layers).tolist()))


def codec_layers(model, k, layers):
    """The codec's layers (`uqdm.codec.layers.Refinement`): ideal bits under the unquantised prior
    and the decoder's estimate of x = k − u after each."""
    refinement, out = Refinement(model, layers), []
    for _ in range(layers):
        bits = refinement.receive(refinement.values(k))
        out.append((bits, refinement.fill() - model.u))
    return out


def today(P, x, s, j, layers, fill="zero"):
    """Format version 3's layers: symbols by scale index j, largest first, exact; the others at
    x = 0 (μ_p) or, with fill="mean", at E[x] under P."""
    est = torch.zeros(P.shape[0], dtype=torch.float64) if fill == "zero" else (P * x).sum(1)
    out = []
    rows = torch.arange(P.shape[0])
    for index in split(j, layers):
        est[index] = x[index, s[index]]
        out.append((float(-torch.log2(P[index, s[index]]).sum()), est.clone()))
    return out


def run_image(net, image: torch.Tensor, seed: int, layers: int, schemes: dict, code: bool) -> dict:
    header = Header(bytes(8), image.shape[1], image.shape[2], image.shape[1], net.n_timesteps, layers, seed)
    x_img = to_centered(image[None]).double()
    psnr = lambda picture: psnr_per_image(picture[None], image[None]).item()
    walk = Walk(net, _top(net, [header], image.shape[0]))
    curves = {name: [] for name in schemes}  # per scheme: (bits, psnr) after each layer
    steps, step_bytes = [], []
    for node, u, (model,) in _coded_steps(net, walk, [header], image.shape[0]):
        k = quantization_index(net.posterior_mean(x_img, node.z_t, node.step), node.prior.mean, node.step.delta, u)
        P, x = fine_tables(model)
        r_max = (P.shape[1] - 1) // 2
        s = (k.flatten().long().clamp(-r_max, r_max) + r_max)
        step_bits = float(-torch.log2(P[torch.arange(len(s)), s]).sum())
        steps.append((step_bits, psnr(_show(net, header, "denoise", node.i, node.z_t, node.prior))))
        widths = {}
        for name, (kind, arg) in schemes.items():
            if kind == "codec":
                points = codec_layers(model, k.flatten(), layers)
            elif kind == "today":
                points = today(P, x, s, model.j, layers, arg or "zero")
            elif kind == "lagrangian":
                shares, ladder, fill_zero = arg
                points = lagrangian(P, x, s, shares, fill_zero, ladder)
            else:
                shares, estimate = arg
                if shares not in widths:
                    widths[shares] = choose_widths(P, x, list(shares))
                points = refine(P, x, s, widths[shares], estimate)
            for bits, est in points[:-1]:
                z_s = node.prior.mean + est.view(node.prior.mean.shape) * node.step.delta
                curves[name].append((bits, psnr(_show(net, header, "denoise", node.i + 1, z_s, None))))
            curves[name].append((points[-1][0], None))  # the step point (bits only: its PSNR is the next step's)
        if code:
            one = len(coder.encode(model, k.flatten().long()))
            step_bytes.append({"one_layer": one, **{str(sh): coded_bytes(P, x, s, w) for sh, w in widths.items()}})
        node.quantize(k, u)
    steps.append((0.0, psnr(_show(net, header, "denoise", net.n_timesteps, walk.z, None))))
    return {"steps": steps, "curves": curves, "step_bytes": step_bytes, "widths": {str(k): v for k, v in widths.items()}}


def summarise(results: list[dict], layers: int, pixels: int) -> dict:
    """Mean curves: cumulative bpp and PSNR at every point, and each layer point's distance to the chord."""
    n = len(results)
    T = len(results[0]["steps"]) - 1
    step_bits = [sum(r["steps"][i][0] for r in results) / n for i in range(T)]
    step_psnr = [sum(r["steps"][i][1] for r in results) / n for i in range(T + 1)]
    step_bpp = [sum(step_bits[:i]) / pixels for i in range(T + 1)]
    out = {"step_bpp": step_bpp, "step_psnr": step_psnr, "schemes": {}}
    for name in results[0]["curves"]:
        rows = []
        for i in range(T):
            for l in range(layers - 1):
                bits = sum(sum(p[0] for p in r["curves"][name][i * layers: i * layers + l + 1]) for r in results) / n
                q = sum(r["curves"][name][i * layers + l][1] for r in results) / n
                bpp = step_bpp[i] + bits / pixels
                f = (bpp - step_bpp[i]) / (step_bpp[i + 1] - step_bpp[i])
                chord = step_psnr[i] + f * (step_psnr[i + 1] - step_psnr[i])
                rows.append({"step": i + 1, "layer": l + 1, "bpp": bpp, "psnr": q, "vs_chord": q - chord})
        out["schemes"][name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--kodak", required=True)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--code", action="store_true", help="also range-code the refinement layers")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L = args.layers
    equal = tuple(l / L for l in range(1, L))
    schemes = {"format 3 (today)": ("today", None),
               "format 4 (the codec's refinement)": ("codec", None),
               "today's order, fill E[k] - u": ("today", "mean"),
               "refine, equal widths, mean": ("refine", (equal, "mean")),
               "refine, equal widths, centre": ("refine", (equal, "centre")),
               "by slope, exact only": ("lagrangian", (equal, (1.0,), False)),
               "by slope, ladder 16..1": ("lagrangian", (equal, LADDER, False)),
               "by slope, ladder 9, 3, 1": ("lagrangian", (equal, (9.0, 3.0, 1.0), False))}
    net = codec_model(load_model(args.ckpt), mode="portable")
    paths = sorted(Path(args.kodak).glob("kodim*.png"))[: args.images]
    images = [box_resize_center_crop(load_image(p), 64) for p in paths]
    results = []
    for n, image in enumerate(images):
        with torch.inference_mode(), net.network.arranged(_layouts([Header(bytes(8), *image.shape[1:], 64, 1, 1, 0)])):
            results.append(run_image(net, image, n, L, schemes, args.code))
        print(f"image {n}: widths {results[-1]['widths']}", flush=True)
        if args.code:
            print(f"  bytes per step {results[-1]['step_bytes']}", flush=True)
    summary = summarise(results, L, images[0].shape[1] * images[0].shape[2])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refinement.json").write_text(json.dumps({"summary": summary, "images": results}, indent=1) + "\n")
    print("step points:", " ".join(f"{b:.2f} bpp {q:.2f} dB" for b, q in zip(summary["step_bpp"], summary["step_psnr"])))
    for name, rows in summary["schemes"].items():
        print(f"{name}:")
        for r in rows:
            print(f"  step {r['step']} layer {r['layer']}: {r['bpp']:.3f} bpp {r['psnr']:.2f} dB ({r['vs_chord']:+.2f})")


if __name__ == "__main__":
    main()
