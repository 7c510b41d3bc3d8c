"""`make bench`: every hot path side by side, written to bench/results.json and printed as a table.

Each figure is a median over repeats after a warm-up; each comparison is a ratio measured in the
same run on the same machine.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import codec  # noqa: E402
import network  # noqa: E402
import train  # noqa: E402


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = value
    return out


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    results = {"machine": machine()}
    results["network"] = network.run()
    results["train"] = train.run(workdir=HERE / ".train")
    results["codec"] = codec.run()
    results["codec"]["scaling"] = codec.run_scaling(results["codec"])
    results["wall_s"] = time.perf_counter() - start
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    rows = flatten("", {k: v for k, v in results.items() if k != "machine"}, {})
    print(f"machine: {results['machine']}")
    print(f"{'figure':44s} value")
    for key, value in rows.items():
        print(f"{key:44s} {value:.4g}" if isinstance(value, float) else f"{key:44s} {value}")


if __name__ == "__main__":
    main()
