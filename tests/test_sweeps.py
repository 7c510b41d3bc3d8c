"""The W&B sweep files, `uqdm sweep-local` and the agent launcher (`make sweep`), with no W&B server."""

import csv
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uqdm import sweeps
from uqdm.cli import main

REPO = Path(__file__).resolve().parents[1]
STEPS = REPO / "sweeps" / "steps.yaml"
SCHEDULE = REPO / "sweeps" / "schedule.yaml"
SCHEDULES = [
    {"noise_schedule": "learned_linear"},
    *({"noise_schedule": "fixed_linear", "gamma_min": g} for g in (-13.3, -12.3, -10.0, -8.0)),
]


@pytest.mark.parametrize("path", [STEPS, SCHEDULE], ids=["steps", "schedule"])
def test_sweep_file_is_a_grid_over_the_cifar10_experiment(path):
    config = sweeps.load_sweep(path)  # raises on any violation (W&B's schema too, where installed)
    assert config["method"] == "grid"
    assert config["metric"] == {"name": "val/bpd", "goal": "minimize"}
    command = config["command"]
    assert command[command.index("fit") + 1 :] == [
        "--config", "experiments/cifar10.yaml",  # which has ProgressiveMetrics: val/psnr/<method>/<point>
        "${args}",
    ]
    # The checks `wandb sweep` itself makes before sending a sweep, and the agent's argument builder.
    from wandb.apis.public.sweeps import _validate_config_and_fill_distribution
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    assert _validate_config_and_fill_distribution(config) == config
    for params in sweeps.grid(config):
        create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})


@pytest.mark.parametrize("path", [STEPS, SCHEDULE], ids=["steps", "schedule"])
def test_sweep_file_passes_wandb_schema_and_grid_order(path):
    """W&B's own validator (the `sweeps` package of `wandb[sweeps]`, which `wandb sweep --controller`
    runs) accepts the file, and its grid search proposes the runs sweep-local runs, in that order."""
    wandb_sweeps = pytest.importorskip("sweeps", reason="W&B's sweeps package (wandb[sweeps]) is not installed")
    if not hasattr(wandb_sweeps, "schema_violations_from_proposed_config"):  # this repository's sweeps/
        pytest.skip("W&B's sweeps package (wandb[sweeps]) is not installed")
    from sweeps.grid_search import grid_search_next_runs

    config = yaml.safe_load(path.read_text())
    assert wandb_sweeps.schema_violations_from_proposed_config(config) == []
    proposed = [run for run in grid_search_next_runs([], config, n=100) if run is not None]
    assert [{k: v["value"] for k, v in run.config.items()} for run in proposed] == sweeps.grid(config)


def dry_run(capsys, *args) -> list[list[str]]:
    """The commands `sweep-local --dry-run` prints, each without its environment assignments."""
    main(["sweep-local", *args, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line)
        assert words[0].startswith("WANDB_MODE=offline") and words[1].startswith("WANDB_RUN_ID=")
        commands.append(words[2:])
    return commands


FIT = ["/usr/bin/env", sys.executable, "-m", "uqdm", "fit"]  # how a run's command starts


def test_dry_run_steps(capsys, monkeypatch, print_config):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    commands = dry_run(capsys, "sweeps/steps.yaml")
    assert len(commands) == 7
    for steps, command in zip([1, 2, 3, 4, 6, 8, 16], commands):
        assert f"--model.n_timesteps={steps}" in command
        assert command[:5] == FIT
        config = print_config(*command[5:])
        assert config["model"]["n_timesteps"] == steps
        assert config["data"]["class_path"] == "uqdm.data.CIFAR10"
        assert config["trainer"]["logger"]["init_args"]["name"].startswith(f"cifar10-T{steps}-")  # omegaconf+
        callbacks = [callback["class_path"] for callback in config["trainer"]["callbacks"]]
        assert callbacks.count("uqdm.evaluation.ProgressiveMetrics") == 1
        assert callbacks[-1] == "uqdm.sweeps.FinalMetrics"


def test_dry_run_schedule(capsys, monkeypatch, print_config):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    commands = dry_run(capsys, "sweeps/schedule.yaml", "--max-runs", "100")
    assert len(commands) == 10
    expected = [(schedule, prior) for schedule in SCHEDULES for prior in ("logistic", "normal")]
    for (schedule, prior), command in zip(expected, commands):
        assert f"--model={schedule}" in command and f"--model.prior_type={prior}" in command
        assert command[:5] == FIT
        config = print_config(*command[5:])
        model = config["model"]
        assert model["prior_type"] == prior
        assert model["noise_schedule"] == schedule["noise_schedule"]
        assert model["gamma_min"] == schedule.get("gamma_min", -12.3)  # else cifar10.yaml's
        assert model["n_timesteps"] == 4 and model["gamma_max"] == 6.0
        name = config["trainer"]["logger"]["init_args"]["name"]
        assert name == f"cifar10-T4-{schedule['noise_schedule']}-{prior}"


def test_dry_run_options(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    commands = dry_run(capsys, "sweeps/steps.yaml", "--max-runs", "2", "--set", "trainer.max_steps=10",
                       "--set", "model.gamma_min=-10", "--out", str(tmp_path / "out"))
    assert len(commands) == 2
    for command in commands:
        assert command[-4:-2] == ["--trainer.max_steps=10", "--model.gamma_min=-10"]
        assert command[-1].startswith(f"--trainer.callbacks.init_args.path={tmp_path / 'out'}/")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: random\nparameters: {a: {values: [1, 2]}}\n", "grid sweeps only"),
        ("method: grid\nparameters: {a: {min: 1, max: 3}}\n", "parameter a"),
        ("method: grid\n", "no parameters"),
        ("[1, 2]\n", "YAML mapping"),
    ],
)
def test_sweep_local_refuses_what_it_cannot_run(tmp_path, capsys, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        main(["sweep-local", str(path), "--dry-run"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_sweep_local_runs_two_runs_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    """A real sweep-local: the first 2 runs of a 3-run grid on the default experiment, shrunk to 2
    steps with --set, both at once, W&B offline."""
    sweep = {
        "name": "tiny",
        "method": "grid",
        "metric": {"name": "val/bpd", "goal": "minimize"},
        "parameters": {"model.n_timesteps": {"values": [1, 2, 4]}},
        "command": ["${env}", "${interpreter}", "-m", "uqdm", "fit",
                    "--config", str(REPO / "experiments" / "default.yaml"), "${args}"],
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    small = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
             "trainer.accelerator=cpu", "data.init_args.batch_size=2", "data.init_args.crop_size=16",
             "data.init_args.train_samples=4", "data.init_args.val_samples=2", "model.embedding_dim=8",
             "model.norm_groups=4"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # sweep-local's runs go offline all the same
    main(["sweep-local", "tiny.yaml", "--max-runs", "2", "--parallel", "2",
          *(arg for setting in small for arg in ("--set", setting))])
    out = tmp_path / "runs" / "sweep-local" / "tiny"
    printed = capsys.readouterr().out
    assert f"summary: {out.relative_to(tmp_path)}/summary.csv" in printed

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["model.n_timesteps"] for row in rows] == ["1", "2"]
    for row in rows:
        assert row["status"] == "ok"
        assert math.isfinite(float(row["val/bpd"])) and float(row["wall_s"]) > 0
        run = out / row["run"]
        assert (run / "metrics.json").is_file() and (run / "output.log").is_file()
        assert list((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{row['run']}"))  # offline W&B
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def agents(tmp_path, gpus: str | None, per_run: int | None = None, **extra) -> subprocess.CompletedProcess:
    """scripts/sweep_agents.sh in DRY_RUN mode with CUDA_VISIBLE_DEVICES standing in for the GPUs."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPUS_PER_RUN", "SWEEP_ID")}
    env.update(DRY_RUN="1", PATH=f"{tmp_path}:{env['PATH']}")  # stand-ins for nvidia-smi and wandb go there
    env.update(extra)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if per_run is not None:
        env["GPUS_PER_RUN"] = str(per_run)
    return subprocess.run(["bash", str(REPO / "scripts" / "sweep_agents.sh"), str(STEPS)], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)


def pinned(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return [line.split()[0].removeprefix("CUDA_VISIBLE_DEVICES=") for line in lines if "wandb agent" in line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_agents_one_per_gpu_or_per_group(tmp_path):
    result = agents(tmp_path, "0,1,2,3")
    assert result.stdout.splitlines()[0] == f"wandb sweep --project uqdm {STEPS}"
    assert pinned(result) == ["0", "1", "2", "3"]
    assert all(line.split()[1:4] == ["wandb", "agent", "ENTITY/PROJECT/SWEEP_ID"]
               for line in result.stdout.splitlines()[1:])
    assert pinned(agents(tmp_path, "0,1,2,3", 2)) == ["0,1", "2,3"]
    assert pinned(agents(tmp_path, "4,5,6,7", 4)) == ["4,5,6,7"]
    result = agents(tmp_path, "0,1,2", 2)
    assert pinned(result) == ["0,1"] and "leaving the last 1 of 3 GPUs unused" in result.stderr
    result = agents(tmp_path, "", None)
    assert pinned(result) == [""] and "no GPU visible" in result.stderr
    # nvidia-smi's list when CUDA_VISIBLE_DEVICES is unset (a stand-in here).
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nfor i in 0 1; do echo \"GPU $i: Fake GPU (UUID: GPU-$i)\"; done\n")
    fake.chmod(0o755)
    assert pinned(agents(tmp_path, None)) == ["0", "1"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_agents_join_an_existing_sweep_and_refuse_too_few_gpus(tmp_path):
    result = agents(tmp_path, "0,1", SWEEP_ID="me/uqdm/abc123", AGENT_COUNT="3")
    assert "wandb sweep" not in result.stdout
    assert [line.split()[1:6] for line in result.stdout.splitlines()] == [
        ["wandb", "agent", "--count", "3", "me/uqdm/abc123"]] * 2
    result = agents(tmp_path, "0", 2)
    assert result.returncode == 2 and "only 1 GPU(s) visible" in result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_agents_create_the_sweep_and_start_pinned_agents(tmp_path):
    """The real path, with a stand-in `wandb` that prints what `wandb sweep` prints (coloured)."""
    fake = tmp_path / "wandb"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = sweep ]; then\n'
        '  echo "wandb: Creating sweep with ID: abc123" >&2\n'
        "  printf 'wandb: Run sweep agent with: \\033[33mwandb agent me/uqdm/abc123\\033[0m\\n' >&2\n"
        "  exit 0\n"
        "fi\n"
        'echo "$* on [$CUDA_VISIBLE_DEVICES]"\n'
    )
    fake.chmod(0o755)
    result = agents(tmp_path, "0,1,2,3", 2, DRY_RUN="0", LOG_DIR=str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert "more machines: run 'wandb agent me/uqdm/abc123' there" in result.stdout
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["me-uqdm-abc123-agent0.log", "me-uqdm-abc123-agent1.log"]
    assert [p.read_text() for p in logs] == ["agent me/uqdm/abc123 on [0,1]\n", "agent me/uqdm/abc123 on [2,3]\n"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sweep_runs_the_agent_script():
    result = subprocess.run(["make", "-n", "--no-print-directory", "sweep", "SWEEP=sweeps/schedule.yaml", "GPUS_PER_RUN=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "sweep_agents.sh" in line]
    assert len(commands) == 1 and "GPUS_PER_RUN=2 bash scripts/sweep_agents.sh sweeps/schedule.yaml" in commands[0]
