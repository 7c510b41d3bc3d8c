"""The training command line: LightningCLI with OmegaConf configs, as `uqdm`, `lightning` and `python -m uqdm`."""

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uqdm.cli import COMMANDS, TOOLS, main, tools_parser
from uqdm.evaluation.report import rd_curves

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
    # the final progressive RD table, in the run's folder, in `uqdm evaluate`'s results.json layout
    rd = json.loads((ckpts[0].parent.parent / "rd.json").read_text())
    assert rd["global_step"] == 4 and rd["images"] == 4 and rd["size"] == 16
    assert [p["name"] for p in rd["uqdm"]["points"]] == ["z1", "step_1", "step_2", "lossless"]
    bpps = [p["bpp_ideal"] for p in rd["uqdm"]["points"]]
    assert bpps[0] == 0 and bpps == sorted(bpps) and bpps[-1] == pytest.approx(rd["uqdm"]["nelbo_bpp"])
    bpp, psnr = rd_curves(rd)["UQDM (denoise)"]
    assert bpp == [p["bpp_ideal"] for p in rd["uqdm"]["points"][:-1]]
    assert psnr[0] > 0 and all(v is None or v > 0 for v in psnr)  # None: every image exact there


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


@pytest.mark.parametrize("option,says", [
    ("--trainer.gradient_clip_val=0.5", "use --model.gradient_clip_val=0.5 "),
    ("--trainer.gradient_clip_algorithm=value", "use --model.gradient_clip_algorithm=value "),
    ("--trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 is not supported"),
])
def test_trainer_options_the_module_took_over_are_one_line_errors(tmp_path, capsys, monkeypatch, option, says):
    """The module steps the optimiser itself (to skip non-finite steps): clipping is a model option."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["uqdm"])  # as a user runs it (LightningCLI warns about pytest's argv)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEFAULT, *TINY, option])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("uqdm: error: ") and err.count("\n") == 1, err
    assert says in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_help_lists_every_command_in_one_line_each_without_importing_them(tmp_path):
    probe = ("import sys; from uqdm.cli import main; main(['--help']); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'lightning', 'wandb'}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    *listing, imported = out.stdout.splitlines()
    assert imported == "[]"
    names = ["fit", "validate", "test", "predict", "compress", "decompress", "truncate", "info", "evaluate",
             "import-official", "sweep-local", "plot"]
    described = [line.split()[0] for line in listing if line.startswith("  ") and len(line.split()) > 1]
    assert described == names


def test_an_unknown_command_is_one_line_that_names_them_all(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evalute", "--ckpt", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("uqdm: error: unknown command 'evalute'")
    assert all(name in err for name in COMMANDS)


def test_the_command_table_matches_what_the_modules_and_lightning_register(capsys):
    from lightning.pytorch.cli import LightningCLI

    assert {name for name, (module, _) in COMMANDS.items() if module is None} == set(LightningCLI.subcommands())
    for module in set(TOOLS.values()):
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(subparsers)
        assert set(subparsers.choices) == {name for name, m in TOOLS.items() if m == module}
    assert tools_parser("truncate").parse_args(["truncate", "f", "--steps", "1", "-o", "g"]).command == "truncate"
    with pytest.raises(SystemExit) as exit_:  # a command's help starts with its line of `uqdm --help`
        main(["truncate", "--help"])
    assert exit_.value.code == 0 and COMMANDS["truncate"][1] in capsys.readouterr().out
