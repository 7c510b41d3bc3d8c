"""`uqdm sweep-local`: run a W&B sweep file's grid without a W&B server.

The grid is expanded in W&B's grid-search order (parameters sorted by name, the last one varying
fastest, as the `sweeps` package's grid search does) and each run's command line is built with
W&B's own agent helpers (`create_sweep_command`, `create_sweep_command_args`) and the agent's macro
substitution, so `${args}` gives `--model.n_timesteps=4`, which LightningCLI reads as an override.
Two things differ from `wandb agent`: `${interpreter}` is the Python running sweep-local (the agent
uses whatever `python` is on PATH), and every run also gets the `FinalMetrics` callback below
(how the final metric reaches the summary: offline W&B runs keep their summary in a binary file).
Runs go with WANDB_MODE=offline and WANDB_RUN_ID set, like an agent's runs, and their W&B files
and checkpoints land where the experiment config puts them.
"""

import csv
import itertools
import json
import math
import os
import random
import shlex
import string
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from .errors import UQDMError

METRICS_FILE = "metrics.json"


class FinalMetrics(Callback):
    """On global rank 0, writes the trainer's last logged metrics (`trainer.callback_metrics`, the
    values W&B keeps as a run's summary) to the JSON file `path` when fit, validate or test ends."""

    def __init__(self, path: str):
        self.path = path

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "global_step": trainer.global_step, "world_size": trainer.world_size,
                  "metrics": metrics}
        path.write_text(json.dumps(record, indent=1))


def load_sweep(path: str | os.PathLike) -> dict:
    """The sweep file as a dict, after W&B's schema check (when W&B's `sweeps` package is installed)
    and sweep-local's own requirements (method grid, every parameter a `values` list or a `value`)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UQDMError(f"cannot read sweep file {path}: {error}") from None
    if not isinstance(config, dict):
        raise UQDMError(f"{path}: a sweep file is a YAML mapping")
    problems = schema_violations(config)
    if config.get("method") != "grid":
        problems.append(f"sweep-local runs grid sweeps only (method: {config.get('method')!r})")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        problems.append("no parameters")
    else:
        for name, spec in parameters.items():
            if not (isinstance(spec, dict) and ("value" in spec or isinstance(spec.get("values"), list))):
                problems.append(f"parameter {name}: sweep-local needs `values: [...]` or `value: ...`")
    if problems:
        raise UQDMError(f"{path}: " + "; ".join(p.replace("\n", " ") for p in problems))
    return config


def schema_violations(config: dict) -> list[str]:
    """W&B's validation of a sweep config (what `wandb sweep --controller` runs, the same JSON schema the
    server checks); an empty list when valid. Needs W&B's `sweeps` package (`wandb[sweeps]`); without it
    returns [] and only sweep-local's own checks apply."""
    try:
        with warnings.catch_warnings():  # its pydantic models warn about renamed options
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError:
        return []
    check = getattr(sweeps, "schema_violations_from_proposed_config", None)  # not the sweeps/ folder of
    return [] if check is None else list(check(config))  # this repository, seen from its root as a namespace package


def grid(config: dict) -> list[dict[str, Any]]:
    """Every combination of parameter values, in W&B's grid-search order: names sorted, last fastest."""
    names = sorted(config["parameters"])
    choices = [_values(config["parameters"][name]) for name in names]
    return [dict(zip(names, combination)) for combination in itertools.product(*choices)]


def _values(spec: dict) -> list:
    return [spec["value"]] if "value" in spec else list(spec["values"])


def swept_names(config: dict) -> list[str]:
    """The parameters with more than one value, sorted."""
    return [name for name in sorted(config["parameters"]) if len(_values(config["parameters"][name])) > 1]


def run_command(config: dict, params: dict[str, Any], run_dir: Path) -> list[str]:
    """The command a W&B agent would run for `params`, with `${interpreter}` = this Python."""
    from wandb.sdk.launch.sweeps.utils import (
        DEFAULT_SWEEP_COMMAND,
        create_sweep_command,
        create_sweep_command_args,
    )

    template = create_sweep_command(list(config.get("command") or DEFAULT_SWEEP_COMMAND))  # copies: it edits in place
    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    if "${program}" in template and not config.get("program"):
        raise UQDMError("the sweep's command uses ${program} but the sweep file sets no program")
    macros.update(
        interpreter=[sys.executable],
        program=[config.get("program")],
        env=["/usr/bin/env"],
        args_json_file=[str(run_dir / "args.json")],
    )
    command = []
    for chunk in map(str, template):  # the agent's substitution: a macro is a whole list element
        command += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def metrics_args(run_dir: Path) -> list[str]:
    """LightningCLI arguments adding `FinalMetrics` writing to `run_dir`."""
    return ["--trainer.callbacks+=uqdm.sweeps.FinalMetrics",
            f"--trainer.callbacks.init_args.path={run_dir / METRICS_FILE}"]


def _run_id() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=8))


def plan(config: dict, out: Path, overrides: list[str], max_runs: int | None) -> list[dict]:
    """One entry per run: its parameters, id, folder, environment additions and command (the agent's
    command, then `overrides`, then the FinalMetrics callback)."""
    runs = []
    for params in grid(config)[:max_runs]:
        run_id = _run_id()
        run_dir = out / run_id
        command = run_command(config, params, run_dir) + list(overrides) + metrics_args(run_dir)
        env = {"WANDB_MODE": "offline", "WANDB_RUN_ID": run_id}
        runs.append({"params": params, "id": run_id, "dir": run_dir, "env": env, "command": command})
    return runs


def execute(run: dict, metric: str) -> dict:
    """Run one command (output to its folder's output.log) and return its summary row."""
    run["dir"].mkdir(parents=True, exist_ok=True)
    (run["dir"] / "args.json").write_text(json.dumps(run["params"]))  # also what ${args_json_file} names
    start = time.perf_counter()
    with open(run["dir"] / "output.log", "wb") as log:
        code = subprocess.call(run["command"], env={**os.environ, **run["env"]}, stdout=log,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    try:
        value = json.loads((run["dir"] / METRICS_FILE).read_text())["metrics"].get(metric, math.nan)
    except (OSError, ValueError, KeyError):
        value = math.nan
    return {"run": run["id"], **run["params"], metric: value, "wall_s": round(wall, 1),
            "status": "ok" if code == 0 else f"exit {code}"}


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else "-"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def write_summary(rows: list[dict], config: dict, metric: str, out: Path) -> tuple[Path, Path]:
    """summary.csv (one row per run) and summary.png: the metric against the first swept parameter,
    one line per combination of the other swept parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(rows[0])
    table = out / "summary.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(row[c]) for c in columns] for row in rows])

    swept = swept_names(config) or sorted(config["parameters"])[:1]
    x_name, series_names = swept[0], swept[1:]
    xs = list(dict.fromkeys(_label(row[x_name]) for row in rows))
    numeric = all(isinstance(row[x_name], (int, float)) and not isinstance(row[x_name], bool) for row in rows)
    fig, ax = plt.subplots(figsize=(6.4 if numeric else max(6.4, 2.0 * len(xs)), 4.2))
    for key in dict.fromkeys(tuple(_label(row[n]) for n in series_names) for row in rows):
        points = [row for row in rows if tuple(_label(row[n]) for n in series_names) == key]
        x = [row[x_name] if numeric else xs.index(_label(row[x_name])) for row in points]
        label = ", ".join(f"{n}={v}" for n, v in zip(series_names, key)) or None
        ax.plot(x, [row[metric] for row in points], "o-", label=label)
    if numeric:
        values = sorted({row[x_name] for row in rows})
        if values[0] > 0 and values[-1] >= 8 * values[0]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
    else:
        ax.set_xticks(range(len(xs)), [label.replace(", ", "\n") for label in xs], fontsize=8)
    ax.set_xlabel(x_name)
    ax.set_ylabel(metric)
    ax.set_title(config.get("name") or "sweep")
    ax.grid(alpha=0.3)
    if series_names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figure = out / "summary.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return table, figure


def _print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


def sweep_local(args) -> None:
    config = load_sweep(args.sweep)
    if args.max_runs is not None and args.max_runs < 1:
        raise UQDMError("--max-runs must be at least 1")
    if args.parallel < 1:
        raise UQDMError("--parallel must be at least 1")
    out = Path(args.out or Path("runs") / "sweep-local" / Path(args.sweep).stem)
    runs = plan(config, out, args.overrides, args.max_runs)
    if args.dry_run:
        for run in runs:
            env = " ".join(f"{k}={v}" for k, v in run["env"].items())
            print(f"{env} {shlex.join(run['command'])}")
        return
    metric = (config.get("metric") or {}).get("name", "val/bpd")
    print(f"sweep-local: {len(runs)} runs of {args.sweep}, {args.parallel} at a time, in {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = []
        for row in pool.map(lambda run: execute(run, metric), runs):
            print(f"  {row['run']} {row['status']}: {metric} {_cell(row[metric])} in {row['wall_s']} s", flush=True)
            rows.append(row)
    _print_table(rows)
    table, figure = write_summary(rows, config, metric, out)
    print(f"summary: {table}, plot: {figure}")
    failed = [row["run"] for row in rows if row["status"] != "ok"]
    if failed:
        raise UQDMError(f"{len(failed)} of {len(rows)} runs failed; see {out}/RUN/output.log for {', '.join(failed)}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep-local",
        description="Expand a W&B sweep file's grid as W&B would and run each command (W&B offline), "
        "then write OUT/summary.csv (swept values, final metric, wall time) and OUT/summary.png. "
        "Each --set KEY=VALUE is appended to every run's command as --KEY=VALUE.",
    )
    parser.add_argument("sweep", help="the sweep YAML (W&B format, method: grid)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        type=lambda s: "--" + s.removeprefix("--"),
                        help="a LightningCLI override added to every run, e.g. --set trainer.max_steps=100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    parser.add_argument("--max-runs", type=int, metavar="N", help="only the first N runs of the grid")
    parser.add_argument("--parallel", type=int, default=1, metavar="P", help="runs at a time (default 1)")
    parser.add_argument("--out", metavar="DIR", help="run folders and summary (default runs/sweep-local/SWEEP_NAME)")
    parser.set_defaults(run=sweep_local)
