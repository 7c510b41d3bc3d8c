"""A model's checkpoint file, read weights-only and written atomically, without Lightning.

A uqdm checkpoint is what Lightning writes, a ``torch.save``d dict: the model's flat
hyperparameters under ``hyper_parameters`` and its tensors under ``state_dict`` (named
``model.<name>``, as `UQDMModule` holds the model in ``self.model``). Training's checkpoints hold
the EMA-averaged weights there; `uqdm import-official` writes the same layout. The codec and the
evaluation read the model with `load_model`; Lightning reads the same file with
``UQDMModule.load_from_checkpoint`` or ``--ckpt_path``.
"""

import importlib.metadata
import io
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomic
from .diffusion import DiscreteDiffusion
from .errors import UQDMError
from .hyperparameters import build_model, model_arguments

PREFIX = "model."  # the state_dict names of the model's tensors: `UQDMModule.model`


def _torch_reason(message: str) -> str:
    """The informative line(s) of a ``torch.load`` error, without torch's boilerplate, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    return "; ".join(line for line in lines if not line.startswith(boilerplate)) or lines[0]


def safe_load(path, map_location="cpu", allowed_globals=()) -> dict:
    """``torch.load(path, weights_only=True)``, allowing no globals but `allowed_globals`.

    Raises:
        UQDMError: the file is missing, is not a torch checkpoint, or needs any other global.
    """
    path = Path(path)
    if not path.is_file():
        raise UQDMError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted:
            raise UQDMError(f"refusing to load {path}: it wants the forbidden global {wanted[1]}") from e
        raise UQDMError(f"{path} is not a torch checkpoint ({type(e).__name__}: {_torch_reason(str(e) or '-')})") from e


def load_model(path, map_location="cpu") -> DiscreteDiffusion:
    """The diffusion model (a `UQDM`, or its Gaussian twin) of a uqdm checkpoint, in eval mode.

    Raises:
        UQDMError: as `safe_load`, or when the checkpoint is not a UQDM model's.
    """
    checkpoint = safe_load(path, map_location)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise UQDMError(f"{path} is not a uqdm checkpoint (no hyper_parameters/state_dict)")
    try:
        model = build_model(**model_arguments(hparams))
        model.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()})
    except (TypeError, ValueError, RuntimeError) as e:
        raise UQDMError(f"{path} does not fit a uqdm model: {str(e).splitlines()[0]}") from e
    return model.eval()


def lightning_checkpoint(model: nn.Module, hparams: dict, global_step: int = 0) -> dict:
    """The checkpoint dict of `model` built from `hparams`, as `load_model` and Lightning read it."""
    return {
        "state_dict": {PREFIX + name: tensor for name, tensor in model.state_dict().items()},
        "hyper_parameters": dict(hparams),
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
        "epoch": 0,
        "global_step": global_step,
    }


def save_checkpoint(checkpoint: dict, path) -> None:
    """`torch.save` the checkpoint to `path` atomically."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getvalue())
