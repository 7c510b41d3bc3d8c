"""Weights-only loading of checkpoints, including the ones released with the paper."""

import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from uqdm.errors import UQDMError

try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _np_scalar

# The only non-torch globals in the released checkpoints (NumPy scalars in the Adam state). The
# scalar constructor is pickled as ``numpy.core.multiarray.scalar`` by NumPy 1, ``numpy._core...`` by 2.
NUMPY_SAFE_GLOBALS = [
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),
]

# Released config["model"] key -> ScoreNetwork keyword argument.
OFFICIAL_NETWORK_KEYS = {
    "n_channels": "n_channels",
    "embedding_dim": "embedding_dim",
    "n_blocks": "n_blocks",
    "norm_groups": "norm_groups",
    "attention_everywhere": "attention_everywhere",
    "n_attention_heads": "n_attention_heads",
    "use_fourier_features": "use_fourier_features",
    "dropout_prob": "dropout",
    "learned_prior_scale": "learned_prior_scale",
    "gamma_min": "gamma_min",
    "gamma_max": "gamma_max",
}


def _torch_reason(message: str) -> str:
    """The informative line(s) of a ``torch.load`` error, without torch's boilerplate, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    return "; ".join(line for line in lines if not line.startswith(boilerplate)) or lines[0]


def safe_load(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with only the NumPy globals above allowed.

    Raises:
        UQDMError: the file is missing, is not a torch checkpoint, or needs any other global.
    """
    path = Path(path)
    if not path.is_file():
        raise UQDMError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted:
            raise UQDMError(f"refusing to load {path}: it wants the forbidden global {wanted[1]}") from e
        raise UQDMError(f"{path} is not a torch checkpoint ({type(e).__name__}: {_torch_reason(str(e) or '-')})") from e


def load_official(directory) -> tuple[dict, dict]:
    """Read ``config.json`` and ``checkpoint.pt`` of a released model folder; return ``(config, checkpoint)``."""
    directory = Path(directory)
    config_path, checkpoint_path = directory / "config.json", directory / "checkpoint.pt"
    for p in (config_path, checkpoint_path):
        if not p.is_file():
            raise UQDMError(f"released model folder {directory} has no {p.name}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UQDMError(f"{config_path} is not valid JSON: {e}") from e
    return config, safe_load(checkpoint_path)


def network_kwargs_from_official(config: dict) -> dict:
    """ScoreNetwork keyword arguments from a released ``config.json`` (its ``model`` section)."""
    model = config.get("model", config)
    return {ours: model[theirs] for theirs, ours in OFFICIAL_NETWORK_KEYS.items() if theirs in model}


def load_module(path, map_location="cpu"):
    """A `UQDMModule` from a Lightning checkpoint (training's, or `uqdm import-official`'s), loaded
    weights-only; its `state_dict` holds the averaged weights when training used the EMA callback.

    Raises:
        UQDMError: as `safe_load`, or when the checkpoint is not a UQDM model's.
    """
    from .module import UQDMModule

    checkpoint = safe_load(path, map_location)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise UQDMError(f"{path} is not a uqdm checkpoint (no hyper_parameters/state_dict)")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        module = UQDMModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UQDMError(f"{path} does not fit a uqdm model: {str(e).splitlines()[0]}") from e
    return module.eval()
