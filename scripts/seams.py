"""Seam ratio, bits per pixel and PSNR at every step point of real `.uqdm` files, for each way of
giving the network context across tile borders (`uqdm.codec.windows`):

- `none`: fixed grid, each pixel's picture from its own tile (the codec before format version 4);
- `shifted`: the coding windows move by half a tile on odd steps, pictures unblended;
- `blend`: fixed grid, pictures blended over overlapping windows;
- `both`: shifted coding windows and blended pictures (the default of `uqdm compress`/`decompress`).

    python scripts/seams.py --ckpt tiny.ckpt --kodak ../shared/data/kodak --images kodim01 kodim02 \
        --crop 256 --out eval/seams

`--crop S` codes the centre S×S crop of each full-size Kodak image (0: the whole 768×512 image).
Image n is coded with seed n and one layer per step. Writes OUT/seams.json: per variant and
method, the mean bpp (file bytes up to each step, header included), mean PSNR, worst seam ratio
(over the images and the grids used; `uqdm.evaluation.seams`) and worst border/inside gradient
ratio of the decoded picture alone (`grid_ratio`: 1 where the grid is invisible, whatever the
original's own ratio) at every lossy step point.
"""

import argparse
import json
from pathlib import Path

import torch

from uqdm.codec import compress_progressive, parse
from uqdm.evaluation.quality import psnr_per_image
from uqdm.evaluation.seams import coding_grids, grid_ratio, seam_ratio
from uqdm.images import load_image
from uqdm.options import RECONSTRUCTIONS
from uqdm.weights import load_model

VARIANTS = {"none": ("fixed", False), "shifted": ("shifted", False), "blend": ("fixed", True), "both": ("shifted", True)}
TILE = 64


def centre_crop(image: torch.Tensor, side: int) -> torch.Tensor:
    if not side:
        return image
    _, h, w = image.shape
    top, left = (h - side) // 2, (w - side) // 2
    return image[:, top : top + side, left : left + side].contiguous()


def measure(module, images: list[torch.Tensor], grid_kind: str, blend: bool, methods) -> dict:
    """Mean bpp and PSNR, worst seam ratio at each lossy step point (one layer per step)."""
    bpp, psnr, seams, raw = [], {m: [] for m in methods}, {m: [] for m in methods}, {m: [] for m in methods}
    for n, image in enumerate(images):
        (encoded,) = compress_progressive(module, [image], [n], methods, tile=TILE, layers=1,
                                          grid_kind=grid_kind, blend=blend)
        pixels = image.shape[1] * image.shape[2]
        bpp.append([8 * end / pixels for end in parse(encoded.data).ends][:-1])
        for m in methods:
            lossy = encoded.points[m][:-1]
            psnr[m].append([psnr_per_image(p[None], image[None]).item() for p in lossy])
            seams[m].append([seam_ratio(p, image, TILE, coding_grids(TILE)) for p in lossy])
            raw[m].append([max(grid_ratio(p, TILE, o) for o in coding_grids(TILE)) for p in lossy])
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]
    worst = lambda rows: [max(col) for col in zip(*rows)]
    return {"bpp": mean(bpp), **{m: {"psnr": mean(psnr[m]), "seam_ratio": worst(seams[m]),
                                     "decoded_ratio": worst(raw[m])} for m in methods}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--kodak", required=True, type=Path)
    p.add_argument("--images", nargs="+", default=["kodim01", "kodim02"], help="Kodak image names")
    p.add_argument("--crop", type=int, default=256, help="centre S×S crop (0: full size)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--methods", nargs="+", default=list(RECONSTRUCTIONS), choices=list(RECONSTRUCTIONS))
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    module = load_model(args.ckpt)
    paths = [args.kodak / f"{name}.png" for name in args.images]
    images = [centre_crop(load_image(path), args.crop) for path in paths]
    results = {"images": [path.name for path in paths], "crop": args.crop}
    for name in args.variants:
        results[name] = measure(module, images, *VARIANTS[name], args.methods)
        print(name, json.dumps(results[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seams.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
