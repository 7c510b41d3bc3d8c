"""Fixtures shared by the tests: the shared data folder and what is made of it (released weights,
Kodak 64×64), the tiny module, its diffusion model and its checkpoint, one-thread running, and the
command line run in-process."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from uqdm.cli import main
from uqdm.codec.fuzz import TINY, save_module, tiny_module as build_tiny_module
from uqdm.diffusion import UQDM, GaussianDiffusion
from uqdm.images import box_resize_center_crop, load_image
from uqdm.released import import_official
from uqdm.weights import save_checkpoint

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared test data folder (released weights, Kodak), next to the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (released UQDM weights and Kodak images)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def released_dir(shared_data) -> Path:
    """The released UQDM-tiny folder (checkpoint.pt, config.json, reference-kodak64.json)."""
    directory = shared_data / "official" / "uqdm-tiny"
    if not (directory / "checkpoint.pt").is_file():
        pytest.skip(f"released UQDM-tiny weights not found in {directory}")
    return directory


@pytest.fixture(scope="session")
def released_ckpt(released_dir, tmp_path_factory) -> Path:
    """The released weights (averaged network and schedule) imported into a uqdm checkpoint."""
    path = tmp_path_factory.mktemp("released") / "tiny-ema.ckpt"
    save_checkpoint(import_official(released_dir), path)
    return path


@pytest.fixture(scope="session")
def kodak64(shared_data) -> list[torch.Tensor]:
    """The 24 Kodak images as the paper evaluates them: box-downsampled to a short side of 64,
    centre 64×64 crop, uint8 3×64×64."""
    paths = sorted((shared_data / "kodak").glob("kodim*.png"))
    if len(paths) != 24:
        pytest.skip(f"the 24 Kodak images not found in {shared_data / 'kodak'}")
    return [box_resize_center_crop(load_image(p), 64) for p in paths]


@pytest.fixture
def tiny_hparams() -> dict:
    """The tiny module's hyperparameters (embedding 8, 4 norm groups, T = 2): a copy per use."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_module():
    """`tiny_module(seed=0, **hparams)`: the tiny module with perturbed random weights (non-trivial
    tables), the one `scripts/fuzz_decoder.py` builds (`uqdm.codec.fuzz.tiny_module`)."""
    return build_tiny_module


@pytest.fixture(scope="session")
def tiny_model(tiny_module):
    """`tiny_model(cls=UQDM, prior_type=None, base_prior_scale, clip, T=3)`: the tiny module's
    diffusion model alone, in float64, on γ from −8 to 5 (prior_type: normal for Gaussian
    diffusion, else logistic)."""

    def build(cls=UQDM, prior_type=None, base_prior_scale="forward_kernel", clip=True, T=3):
        gaussian = cls is GaussianDiffusion
        module = tiny_module(n_timesteps=T, diffusion="gaussian" if gaussian else "uniform",
                             prior_type=prior_type or ("normal" if gaussian else "logistic"),
                             base_prior_scale=base_prior_scale, clip_prior_mean=clip, gamma_min=-8.0, gamma_max=5.0)
        assert type(module.model) is cls
        return module.model.double()

    return build


@pytest.fixture(scope="module")
def module(tiny_module):
    """The tiny module of a test file (a file that needs another one overrides this fixture)."""
    return tiny_module()


@pytest.fixture(scope="module")
def ckpt(module, tmp_path_factory) -> Path:
    """A Lightning-style checkpoint of the file's `module` (weights and hyperparameters)."""
    return save_module(module, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture
def one_thread():
    """Run on one thread: the codec's many small tensor operations are latency-bound, and on a busy
    machine two threads wait on each other. Tests of thread independence set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_exit(capsys, monkeypatch):
    """`cli_exit(argv) -> (exit code, stderr)`: `uqdm ARGV` run in-process where it must exit."""
    monkeypatch.setattr(sys, "argv", ["uqdm"])  # LightningCLI warns when both argv and args are given

    def run(argv: list[str]) -> tuple[int | None, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        return exited.value.code, capsys.readouterr().err

    return run


@pytest.fixture
def print_config(capsys, monkeypatch):
    """`print_config(*args) -> dict`: the config that `uqdm fit ARGS` would run with."""
    monkeypatch.setattr(sys, "argv", ["uqdm"])

    def run(*args: str) -> dict:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["fit", *args, "--print_config"])
        assert exited.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    return run
