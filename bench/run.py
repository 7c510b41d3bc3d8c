"""`make bench`: every hot path side by side, written to bench/results.json and printed as a table.

Each figure is a median over repeats after a warm-up; each comparison is a ratio measured in the
same run on the same machine. `python bench/run.py --only network` runs one section (repeatable:
network, train, codec, scaling, cli) and writes bench/results-network.json instead.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cli_speed  # noqa: E402
import codec  # noqa: E402
import estimators  # noqa: E402
import network  # noqa: E402
import train  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
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


SECTIONS = ("network", "train", "estimators", "codec", "scaling", "cli")


def run_sections(sections) -> dict:
    results = {}
    if "network" in sections:
        results["network"] = network.run()
    if "train" in sections:
        results["train"] = train.run(workdir=HERE / ".train")
    if "estimators" in sections:
        results["estimators"] = estimators.run()
    if "codec" in sections:
        results["codec"] = codec.run()
    if "scaling" in sections:  # the 768×512 point of the area series comes from section 3 when it ran
        scaling = codec.run_scaling(results.get("codec"))
        if "codec" in results:
            results["codec"]["scaling"] = scaling
        else:
            results["scaling"] = scaling
    if "cli" in sections:  # the codec as a user runs it, against the paper's evaluation pass
        results["codec_cli"] = cli_speed.run()
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SECTIONS, action="append", metavar="SECTION",
                        help=f"run only this section ({', '.join(SECTIONS)}; repeatable; default all)")
    args = parser.parse_args(argv)
    sections = args.only or SECTIONS
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    results = {"machine": machine(), **run_sections(sections)}
    results["wall_s"] = time.perf_counter() - start
    name = "results.json" if args.only is None else f"results-{'-'.join(sorted(set(args.only)))}.json"
    (HERE / name).write_text(json.dumps(results, indent=1))
    rows = flatten("", {k: v for k, v in results.items() if k != "machine"}, {})
    print(f"machine: {results['machine']}")
    print(f"{'figure':44s} value")
    for key, value in rows.items():
        print(f"{key:44s} {value:.4g}" if isinstance(value, float) else f"{key:44s} {value}")


if __name__ == "__main__":
    main()
