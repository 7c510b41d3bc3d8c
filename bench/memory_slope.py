"""Peak memory per added pixel of `uqdm compress` and `uqdm decompress`, as a user runs them.

    python bench/memory_slope.py --ckpt tiny.ckpt [--image ../shared/data/kodak/kodim05.png] [--sizes 128 1024]

Each command runs in a fresh process on the image resized to S×S for each size S; its peak RSS is
the operating system's accounting of that finished child (`wait4`'s `ru_maxrss`, as
`/usr/bin/time -f %M` reports it).
The slope is (peak at the largest size − peak at the smallest) / (added pixels), for each command;
the decoded image is checked to equal the input. Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE.parent.parent / "shared" / "data" / "kodak" / "kodim05.png"


def peak_rss(command: list[str]) -> int:
    """Run `command` in a fresh process; its peak resident set size in bytes."""
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{errors.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def measure(ckpt: str, image: Path, side: int, work: Path) -> dict:
    """Peak RSS of compressing and decompressing `image` resized to side×side, and whether it is exact."""
    src, coded, out = work / f"{side}.png", work / f"{side}.uqdm", work / f"{side}.out.png"
    Image.open(image).convert("RGB").resize((side, side)).save(src)
    uqdm = [sys.executable, "-m", "uqdm"]
    compress = peak_rss([*uqdm, "compress", "-q", "--ckpt", ckpt, str(src), "-o", str(coded)])
    decompress = peak_rss([*uqdm, "decompress", "-q", "--ckpt", ckpt, str(coded), "-o", str(out)])
    exact = bool(np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(out))))
    return {"compress_bytes": compress, "decompress_bytes": decompress, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--sizes", type=int, nargs=2, default=[128, 1024])
    args = parser.parse_args()
    small, large = sorted(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        points = {side: measure(args.ckpt, args.image, side, Path(tmp)) for side in (small, large)}
    added = large * large - small * small
    slope = {f"{cmd}_bytes_per_pixel": round((points[large][f"{cmd}_bytes"] - points[small][f"{cmd}_bytes"]) / added)
             for cmd in ("compress", "decompress")}
    print(json.dumps({"sizes": [small, large], "points": points, **slope,
                      "threads": os.environ.get("OMP_NUM_THREADS", "all")}, indent=1))


if __name__ == "__main__":
    main()
