"""The training command line: LightningCLI with OmegaConf configs, as `uqdm`, `lightning` and `python -m uqdm`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uqdm.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.yaml")
TINY = [
    "--model.embedding_dim=8", "--model.norm_groups=4", "--model.n_timesteps=2",
    "--data.init_args.batch_size=2", "--data.init_args.crop_size=16",
    "--data.init_args.train_samples=8", "--data.init_args.val_samples=4",
    "--trainer.max_steps=4", "--trainer.val_check_interval=2",
]


def test_print_config_round_trips_with_overrides_and_interpolation(tmp_path, monkeypatch, print_config):
    monkeypatch.chdir(tmp_path)
    first = print_config("--config", DEFAULT, "--model.n_timesteps=8")
    assert first["model"]["n_timesteps"] == 8
    assert first["trainer"]["logger"]["init_args"]["name"] == "default-T8"  # interpolation follows the override
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(first))
    assert print_config("--config", str(saved)) == first


@pytest.mark.parametrize("preset,width", [("tiny", 32), ("small", 64), ("medium", 256), ("big", 256)])
def test_presets_compose_with_an_experiment(tmp_path, monkeypatch, preset, width, print_config):
    monkeypatch.chdir(tmp_path)
    cfg = print_config("--config", str(ROOT / "experiments" / "imagenet64.yaml"),
                       "--config", str(ROOT / "experiments" / "presets" / f"{preset}.yaml"))
    assert cfg["model"]["embedding_dim"] == width
    assert cfg["model"]["warmup"] == 1000 and cfg["model"]["lr"] == pytest.approx(2e-4)
    assert cfg["data"]["class_path"] == "uqdm.data.ImageNet64"


def test_fit_trains_validates_saves_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", DEFAULT, *TINY])
    out = capsys.readouterr().out
    assert "validation bpd: " in out and "at step 0 -> " in out and "at step 4" in out
    assert "checkpoint (last): " in out and "checkpoint (best by val/bpd): " in out and "logs: runs" in out
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1


@pytest.mark.parametrize("launcher", [["-m", "uqdm"], ["-c", "from uqdm.cli import main; main()"]])
def test_module_and_console_entry_points_reach_lightning_cli(tmp_path, launcher):
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, *launcher, "fit", "--config", DEFAULT, "--print_config"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["n_timesteps"] == 4


def test_lightning_and_uqdm_console_scripts_are_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["uqdm"] == scripts["lightning"] == "uqdm.cli:main"


def test_bad_config_value_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEFAULT, "--model.n_timesteps=four"])
    assert exit_.value.code != 0
    assert "n_timesteps" in capsys.readouterr().err
