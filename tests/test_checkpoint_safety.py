"""Checkpoints are read weights-only everywhere (a crafted pickle that calls a global is refused,
by the Trainer, by `uqdm fit/validate/test --ckpt_path`, and by resuming) and written atomically."""

import ast
import os
import stat
from pathlib import Path

import lightning as L
import pytest
import torch

import uqdm
import uqdm.resume as resume
from uqdm.atomic import atomic_write
from uqdm.errors import UQDMError
from uqdm.module import UQDMModule
from uqdm.resume import AtomicCheckpointIO, find_last_checkpoint


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: any global call would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def malicious_checkpoint(tiny_hparams):
    """`malicious_checkpoint(path, marker)`: a file that looks like a Lightning checkpoint of a uqdm
    model but whose pickle calls a global."""

    def write(path: Path, marker: Path) -> Path:
        module = UQDMModule(**tiny_hparams)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "global_step": 0, "epoch": 0, "pytorch-lightning_version": L.__version__,
                    "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
                    "payload": _Payload(marker)}, path)
        return path

    return write


def test_the_crafted_checkpoint_would_run_code_if_unpickled_fully(tmp_path, malicious_checkpoint):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)  # what must never happen in uqdm
    assert marker.exists()


def test_checkpoint_io_refuses_it(tmp_path, malicious_checkpoint):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    for weights_only in (None, False, True):  # whatever the caller asks
        with pytest.raises(UQDMError, match="forbidden global"):
            AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_trainer_resume_refuses_it(tmp_path, malicious_checkpoint, tiny_hparams):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    from uqdm.data import SampleImages

    data = SampleImages(crop_size=8, batch_size=2, train_samples=2, val_samples=2)
    with pytest.raises(UQDMError, match="forbidden global"):
        trainer.fit(UQDMModule(**tiny_hparams), datamodule=data, ckpt_path=path, weights_only=False)
    assert not marker.exists()


CONFIG = """
trainer:
  accelerator: cpu
  max_steps: 1
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {dirpath}, save_last: true}}
model: {{n_timesteps: 2, embedding_dim: 8, norm_groups: 4}}
data:
  class_path: uqdm.data.SampleImages
  init_args: {{crop_size: 8, batch_size: 2, train_samples: 2, val_samples: 2}}
"""


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_cli_refuses_it_in_one_line(tmp_path, command, malicious_checkpoint, cli_exit):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(dirpath=tmp_path / "ckpts"))
    code, err = cli_exit([command, "--config", str(config), "--ckpt_path", str(path)])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("uqdm: error: refusing to load") and "forbidden global" in err
    assert not marker.exists()


def test_cli_refuses_a_malicious_last_checkpoint_on_resume(tmp_path, malicious_checkpoint, cli_exit):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpts").mkdir()
    malicious_checkpoint(tmp_path / "ckpts" / "last.ckpt", marker)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(dirpath=tmp_path / "ckpts"))
    code, err = cli_exit(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert code == 2 and err.startswith("uqdm: error: refusing to load") and "last.ckpt" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["compress", "decompress", "evaluate", "import-official"])
def test_tools_refuse_it_in_one_line(tmp_path, command, malicious_checkpoint, cli_exit):
    """``--ckpt`` of the codec and evaluation commands, and the released folder of import-official."""
    from PIL import Image

    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "file.uqdm").write_bytes(b"UQDM")
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text('{"model": {}}')
    malicious_checkpoint(released / "checkpoint.pt", marker)
    args = {
        "compress": ["--ckpt", str(evil), str(image), "-o", str(tmp_path / "out.uqdm")],
        "decompress": ["--ckpt", str(evil), str(tmp_path / "file.uqdm"), "-o", str(tmp_path / "out.png")],
        "evaluate": ["--ckpt", str(evil), "--images", str(image), "--out", str(tmp_path / "eval")],
        "import-official": [str(released), "-o", str(tmp_path / "imported.ckpt")],
    }[command]
    code, err = cli_exit([command, *args])
    assert code == 2 and err.count("\n") == 1 and "forbidden global" in err, err
    assert not marker.exists() and not (tmp_path / "imported.ckpt").exists()


def test_cli_refuses_weights_only_false(tmp_path, cli_exit):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(dirpath=tmp_path / "ckpts"))
    code, err = cli_exit(["fit", "--config", str(config), "--weights_only", "false"])
    assert code == 2 and "weights-only" in err


def test_every_checkpoint_load_in_uqdm_is_weights_only():
    """Static audit: each ``torch.load`` / ``load_from_checkpoint`` / ``Trainer.fit|validate|test``
    call with a checkpoint in the package passes ``weights_only=True`` (or goes through `safe_load`)."""
    offenders = []
    for path in Path(uqdm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            loads = name == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            loads |= name == "load_from_checkpoint"
            loads |= name in ("fit", "validate", "test", "predict") and any(k.arg == "ckpt_path" for k in node.keywords)
            weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if loads and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offenders.append(f"{path.relative_to(path.parents[1])}:{node.lineno} {name}")
    assert not offenders, f"checkpoint loads without weights_only=True: {offenders}"


# ---- atomic writes ------------------------------------------------------------------------------

def _crashing_save(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    raise OSError("disk full (simulated)")


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, path)
    monkeypatch.setattr(resume.torch, "save", _crashing_save)
    with pytest.raises(UQDMError, match="cannot write checkpoint .*simulated"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(3.0))


def test_crash_while_saving_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(resume.torch, "save", _crashing_save)
    with pytest.raises(UQDMError):
        AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "sub" / "epoch=0-step=1.ckpt")
    assert os.listdir(tmp_path / "sub") == []


def test_atomic_write_replaces_in_one_step_with_the_usual_mode(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"new but")
            raise RuntimeError
    assert path.read_bytes() == b"old"
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["image.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_trainer_checkpoints_go_through_the_plugin(tmp_path, tiny_hparams):
    """A crash inside Trainer.save_checkpoint leaves the previous file intact."""
    from uqdm.data import SampleImages

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                        default_root_dir=tmp_path)
    trainer.fit(UQDMModule(**tiny_hparams), datamodule=SampleImages(crop_size=8, batch_size=2, train_samples=2))
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    original = torch.save
    try:
        resume.torch.save = _crashing_save
        with pytest.raises(UQDMError):
            trainer.save_checkpoint(path)
    finally:
        resume.torch.save = original
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


# ---- `--ckpt_path last` --------------------------------------------------------------------------

def test_find_last_checkpoint(tmp_path):
    def touch(path: Path, mtime: float, run_name: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        loggers = [{"class": "WandbLogger", "version": path.parent.parent.name, "run_name": run_name}]
        torch.save({"uqdm_resume": {"loggers": loggers}}, path)
        os.utime(path, (mtime, mtime))
        return path

    explicit = {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"dirpath": str(tmp_path / "ckpts")}}]}
    assert find_last_checkpoint(explicit) is None
    touch(tmp_path / "ckpts" / "last.ckpt", 1)
    newest = touch(tmp_path / "ckpts" / "last-v1.ckpt", 2)
    touch(tmp_path / "ckpts" / ".last.ckpt.abc.tmp", 3)
    assert find_last_checkpoint(explicit) == newest

    # No dirpath: the W&B run folders of the project, only this experiment's runs.
    wandb = {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"project": "p", "name": "exp", "save_dir": str(tmp_path / "runs")}},
             "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}}]}
    assert find_last_checkpoint(wandb) is None
    mine = touch(tmp_path / "runs" / "p" / "run1" / "checkpoints" / "last.ckpt", 1, "exp")
    touch(tmp_path / "runs" / "p" / "run2" / "checkpoints" / "last.ckpt", 2, "other-experiment")
    assert find_last_checkpoint(wandb) == mine
    wandb["logger"]["init_args"]["id"] = "run2"  # a configured run id picks that run
    assert find_last_checkpoint(wandb).parent.parent.name == "run2"
