"""Checkpoints that survive crashes and resume exactly.

`AtomicCheckpointIO` (a Trainer plugin) writes every checkpoint under a temporary name in the
target folder and renames it into place, so a crash never leaves a half-written file under the
final name, and it reads every checkpoint weights-only. `ResumeState` (a callback, added by the
``uqdm`` command) stores what Lightning's own checkpoint lacks for a resumed run to continue the
interrupted one exactly: the global random generators and the logger's run id.
"""

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from .atomic import atomic_write
from .weights import safe_load
from .errors import UQDMError


class _WriteErrors:
    """A file that remembers the OSError (a full disk) of its last failed `write`."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _is_local(path) -> bool:
    return type(get_filesystem(str(path))).__name__ == "LocalFileSystem"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with a crash-safe save and a weights-only load.

    Save: ``torch.save`` streamed into a temporary file in the checkpoint's folder, fsync, then
    ``os.replace``. (Lightning's own save stages the file in the system temp folder and moves it,
    which across file systems is a copy onto the final name that a crash can cut short.) Load:
    always ``weights_only=True`` with `uqdm.weights.safe_load`'s allow-list, whatever the caller
    asks. A file that needs any other global is refused with a `UQDMError`, as is a failed write.
    Remote (fsspec) paths fall back to Lightning's save, and to its loader with ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_write(path) as f:
                writer = _WriteErrors(f)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError:  # torch's zip writer reports a failed write as a position mismatch
                    if writer.error is None:
                        raise
                    raise writer.error from None
        except OSError as e:  # disk full, permissions: one line from the command, not a traceback
            raise UQDMError(f"cannot write checkpoint {path}: {e.strerror or e}") from e

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            try:
                return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise UQDMError(f"refusing to load {path}: {(str(e).splitlines() or ['-'])[0]}") from e
        return safe_load(path, map_location=map_location or "cpu")


def rng_states() -> dict[str, Any]:
    """The global generators (torch CPU and CUDA, Python, NumPy) as plain types and tensors,
    loadable weights-only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (generators it does not mention are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


RESUME_KEY = "uqdm_resume"


class ResumeState(Callback):
    """Puts into each checkpoint what Lightning leaves out and a resumed run needs to continue the
    interrupted one rather than restart it: the global random generators and the loggers' run ids
    (``checkpoint["uqdm_resume"]``).

    The generators are restored when the checkpoint is loaded, before the training data are drawn.
    The training data themselves do not use them: with uqdm's data modules their order and
    randomness are functions of (seed, epoch, index), and Lightning saves and restores the loader's
    position (`uqdm.data_order.ResumableLoader`). So a run resumed from the checkpoint of any step,
    mid-epoch too and with any number of workers, repeats the uninterrupted one exactly
    (deterministic CPU kernels assumed).

    The run ids are read by the ``uqdm`` command before the loggers start (`continue_logger_runs`).

    Validation does not consume the training generators. Creating a loader iterator draws a seed
    from torch's global generator, and a resumed run skips (or only fast-forwards) the validation of
    the step it resumes at, so the validation loaders get generators of their own, and the state
    after a step is put back when validation (or the sanity check) ends.
    """

    def __init__(self):
        self._after_step: torch.Tensor | None = None
        self._before_sanity: torch.Tensor | None = None

    @staticmethod
    def _own_generators(trainer: Trainer) -> None:
        loaders = trainer.val_dataloaders
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if isinstance(loader, DataLoader) and loader.generator is None:
                loader.generator = torch.Generator().manual_seed(0)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._own_generators(trainer)
        self._before_sanity = torch.get_rng_state()

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._before_sanity is not None:
            torch.set_rng_state(self._before_sanity)
            self._before_sanity = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._own_generators(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self._after_step = torch.get_rng_state()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation within fit runs right after a training step (or at the end of its epoch).
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._after_step is not None:
            torch.set_rng_state(self._after_step)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[RESUME_KEY] = {"rng": rng_states(), "loggers": [_logger_identity(log) for log in trainer.loggers]}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(RESUME_KEY)
        if trainer.state.fn == TrainerFn.FITTING and isinstance(state, dict) and isinstance(state.get("rng"), dict):
            set_rng_states(state["rng"])


def _logger_identity(logger) -> dict:
    """Class name, run id/version and (W&B) run name of a logger, as plain types."""
    version = logger.version
    run_name = None
    if type(logger).__name__ == "WandbLogger":
        run_name = getattr(logger.experiment, "name", None)
    return {
        "class": type(logger).__name__,
        "version": version if isinstance(version, (str, int)) else None,
        "run_name": run_name if isinstance(run_name, str) else None,
    }


def stored_loggers(checkpoint) -> list[dict]:
    """The loggers' identities (`_logger_identity`) that `ResumeState` stored in `checkpoint`
    (empty for checkpoints written without it)."""
    state = checkpoint.get(RESUME_KEY) if isinstance(checkpoint, dict) else None
    loggers = state.get("loggers") if isinstance(state, dict) else None
    return [entry if isinstance(entry, dict) else {} for entry in loggers or []]


# ---- `fit --ckpt_path last` from a config (dict or jsonargparse Namespace, before instantiation) ----

def _listed(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(item) -> str:
    return str(item.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(item, "get") else ""


def _logger_layout(trainer_config) -> tuple[Path, str | None, str | None] | None:
    """(folder holding the first logger's run folders, its configured run id/version or None,
    its W&B run name or None) for WandbLogger, CSVLogger and TensorBoardLogger; None otherwise."""
    loggers = [item for item in _listed(trainer_config.get("logger")) if item is not True and item is not False]
    if not loggers or not hasattr(loggers[0], "get"):
        return None
    kind, args = _class_name(loggers[0]), loggers[0].get("init_args") or {}
    root = trainer_config.get("default_root_dir") or os.getcwd()
    if kind == "WandbLogger":
        save_dir = args.get("save_dir") or args.get("dir") or root
        project = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
        version = args.get("version") or args.get("id")
        return Path(save_dir) / project, version, args.get("name")
    if kind in ("CSVLogger", "TensorBoardLogger"):
        version = args.get("version")
        version = version if version is None or isinstance(version, str) else f"version_{version}"
        return Path(args.get("save_dir") or root) / (args.get("name") or ""), version, None
    return None


def _last_files(folder: Path) -> list[Path]:
    """``last*.ckpt`` in `folder`, as ModelCheckpoint names them."""
    return [p for p in folder.glob("last*.ckpt") if p.is_file()] if folder.is_dir() else []


def find_last_checkpoint(trainer_config) -> Path | None:
    """The checkpoint that ``fit --ckpt_path last`` resumes: the newest ``last*.ckpt`` of the run
    this config describes, or None when there is none.

    ModelCheckpoint callbacks with a ``dirpath`` are looked in directly. One without (or none: the
    Trainer then adds one) writes into the first logger's run folder
    (``save_dir/name/<version>/checkpoints``), known only once the logger has started; so the run
    folders are searched, and for W&B, whose folder holds the runs of the whole project, only
    checkpoints whose run had the configured run name count. Lightning's own "last" finds nothing
    there, and so would start over.
    """
    callbacks = [item for item in _listed(trainer_config.get("callbacks")) if _class_name(item) == "ModelCheckpoint"]
    found = [p for item in callbacks if (item.get("init_args") or {}).get("dirpath")
             for p in _last_files(Path(item["init_args"]["dirpath"]))]
    by_logger = not callbacks or any(not (item.get("init_args") or {}).get("dirpath") for item in callbacks)
    layout = _logger_layout(trainer_config) if by_logger else None
    if layout is not None:
        runs, version, run_name = layout
        if version is not None:
            found += _last_files(runs / str(version) / "checkpoints")
        else:
            candidates = [p for run in (runs.iterdir() if runs.is_dir() else ()) for p in _last_files(run / "checkpoints")]
            candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            if run_name is not None:  # the newest of this experiment's runs (reading as few as possible)
                candidates = [next((p for p in candidates if _run_name_of(p) == run_name), None)]
            found += [p for p in candidates if p is not None]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _run_name_of(path: Path) -> str | None:
    try:
        loggers = stored_loggers(safe_load(path))
    except UQDMError:
        return None
    return loggers[0].get("run_name") if loggers else None


def continue_logger_runs(trainer_config, checkpoint: dict) -> None:
    """Give each configured logger (a config entry, modified in place) the run id (WandbLogger)
    or version that the logger of the same class and position had when `checkpoint` was written,
    unless the config sets one, so that a resumed run logs into the same run and folder."""
    for item, stored in zip(_listed(trainer_config.get("logger")), stored_loggers(checkpoint)):
        args = item.get("init_args") if hasattr(item, "get") else None
        if args is None or stored.get("version") is None or _class_name(item) != stored.get("class"):
            continue
        if "id" in args:  # WandbLogger, whose `version` is an alias of `id`
            if args.get("id") is None and args.get("version") is None:
                args["id"] = stored["version"]
        elif "version" in args and args.get("version") is None:
            args["version"] = stored["version"]
