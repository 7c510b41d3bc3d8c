"""Every layer point of real `.uqdm` files: bits per pixel (file bytes up to the end of each layer,
header included), denoise PSNR of the decoder's picture, and the bytes the layers add.

    python scripts/layer_points.py --ckpt tiny.ckpt --kodak ../shared/data/kodak --images 8 \
        --crops 2 --layers 4 --out eval/layers

Kodak images are prepared at 64×64 (box-downsampled, centre-cropped) and, with `--crops`, also cut
as 256×256 crops of the full-size images (rows 128–383, columns 256–511). Image n is coded with
seed n. Writes OUT/layers.json (mean curves per set, the layers' overhead against the same files
with one layer per step, and whether the PSNR rises at every layer of every image) and
OUT/rd-layers.png (the step points joined by straight lines, and every layer point).
"""

import argparse
import json
from pathlib import Path

import torch

from uqdm.codec import compress, decompress, parse
from uqdm.evaluation.plots import figure_png, rd_figure
from uqdm.evaluation.quality import psnr_per_image
from uqdm.images import box_resize_center_crop, load_image
from uqdm.weights import load_model


def measure(module, images: list[torch.Tensor], layers: int) -> dict:
    """Mean bpp and PSNR at every layer point, the mean overhead of the layers, PSNR rises per image."""
    bpp, quality, overhead, rises = [], [], [], []
    for n, image in enumerate(images):
        data = compress(module, [image], seed=n, layers=layers)[0]
        single = compress(module, [image], seed=n, layers=1)[0]
        decoded = decompress(module, data, all_points=True)
        assert torch.equal(decoded.image, image)
        pixels = image.shape[1] * image.shape[2]
        bpp.append([8 * end / pixels for end in parse(data).ends])
        quality.append([psnr_per_image(p[None], image[None]).item() for p in decoded.points])
        overhead.append(len(data) / len(single) - 1)
        lossy = quality[-1][:-1]
        rises.append(all(b > a for a, b in zip(lossy, lossy[1:])))
        print(f"image {n}: {len(data)} bytes ({len(single)} with one layer per step)", flush=True)
    mean = lambda rows: [sum(r[j] for r in rows) / len(rows) for j in range(len(rows[0]))]
    return {"images": len(images), "bpp": mean(bpp), "psnr": mean(quality), "overhead": sum(overhead) / len(overhead),
            "psnr_rises_at_every_layer": rises}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--kodak", required=True, help="folder of the Kodak PNGs")
    parser.add_argument("--images", type=int, default=8, help="first N Kodak images at 64×64")
    parser.add_argument("--crops", type=int, default=0, help="first N Kodak images as 256×256 crops")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = load_model(args.ckpt)
    paths = sorted(Path(args.kodak).glob("kodim*.png"))
    sets = {"kodak 64×64": [box_resize_center_crop(load_image(p), 64) for p in paths[: args.images]],
            "kodak 256×256 crops": [load_image(p)[:, 128:384, 256:512].contiguous() for p in paths[: args.crops]]}
    results = {name: measure(module, images, args.layers) for name, images in sets.items() if images}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layers.json").write_text(json.dumps({"layers": args.layers, "sets": results}, indent=1) + "\n")
    curves = {}
    for name, r in results.items():
        T = (len(r["bpp"]) - 2) // args.layers
        steps = [j * args.layers for j in range(T + 1)]
        curves[f"UQDM {name}: every layer (L = {args.layers})"] = (r["bpp"][:-1], r["psnr"][:-1])
        curves[f"{name}: the T + 1 step points, joined"] = ([r["bpp"][j] for j in steps], [r["psnr"][j] for j in steps])
    title = f"UQDM tiny, denoise, real file sizes: every layer point (L = {args.layers})"
    (args.out / "rd-layers.png").write_bytes(figure_png(rd_figure(curves, title)))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
