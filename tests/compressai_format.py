"""CompressAI's result-file format, for the tests: how `python -m compressai.utils.plot` reads a
file (its rule restated, as of CompressAI 1.2.5 to 1.2.8; compressai itself needs numpy < 2, so it
is not a test dependency) and files in the layout CompressAI publishes."""

import json
import math
from pathlib import Path


def compressai_plot_reads(path: str | Path, metric: str = "psnr") -> dict:
    """`{"name", "xs", "ys"}` as CompressAI's plot reads `metric` from a result file.

    The curves are under "results" (else at the top level); "psnr" and "ms-ssim" stand for
    "psnr-rgb" and "ms-ssim-rgb"; a missing metric is a ValueError that says
    `metric "<key>" not available`; an MS-SSIM metric is shown in dB, −10·log₁₀(1 − v); the name
    is the file's "name", else its stem.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    results = data.get("results", data)
    key = f"{metric}-rgb" if metric in ("psnr", "ms-ssim") else metric
    if key not in results:
        raise ValueError(f'Error: metric "{key}" not available. Available metrics: {", ".join(results)}')
    ys = results[key]
    if "ms-ssim" in key:
        ys = [-10 * math.log10(1 - v) for v in ys]
    return {"name": data.get("name", path.name.split(".")[0]), "xs": results["bpp"], "ys": ys}


# The first three points of CompressAI's published results/image/kodak/jpeg.json (current layout).
PUBLISHED_JPEG = {
    "name": "JPEG",
    "description": "JPEG. Pillow version 7.1.2",
    "results": {
        "psnr-rgb": [23.779894921045457, 26.57723034342358, 28.042246379237767],
        "ms-ssim-rgb": [0.8030709524949392, 0.8898622319102287, 0.9235836813847224],
        "bpp": [0.22115325927734372, 0.32661437988281244, 0.42312622070312506],
        "encoding_time": [0.011053820451100668, 0.011412620544433594, 0.011948813994725546],
        "decoding_time": [0.005390177170435588, 0.005993495384852092, 0.0057717859745025635],
    },
}

# The first three points of results/image/kodak/paper-bmshj2018-factorized.json (the layout before
# CompressAI 1.2.5: "psnr").
PUBLISHED_OLD_LAYOUT = {
    "name": "official bmshj2018-factorized",
    "description": "official results (mse)",
    "results": {"psnr": [26.775134, 28.348719, 30.020793], "bpp": [0.119752, 0.194591, 0.316000]},
}


def write_published(folder: Path) -> dict[str, Path]:
    """Both published-layout files in `folder`, by stem."""
    paths = {}
    for stem, data in (("jpeg", PUBLISHED_JPEG), ("paper-bmshj2018-factorized", PUBLISHED_OLD_LAYOUT)):
        paths[stem] = folder / f"{stem}.json"
        paths[stem].write_text(json.dumps(data, indent=2))
    return paths
