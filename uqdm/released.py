"""The weights released with the paper: a folder with ``config.json`` and ``checkpoint.pt``.

Everything about their layout lives here. ``config.json``'s ``model`` section names the model's
hyperparameters as uqdm does (`uqdm.hyperparameters.MODEL_ARGUMENTS`) but for `RENAMED`; its
``optim`` section holds the optimiser's. ``checkpoint.pt`` holds the raw network weights under
``model`` and the exponential moving average of all trainable parameters under
``ema.shadow_params``: the network's parameters in order, then the schedule's (``w``). ``ema``
takes that average, network *and* schedule; ``raw`` takes the raw network and keeps the initial
schedule, since the raw ``w`` is stored nowhere. The checkpoint is read weights-only, allowing the
NumPy globals of its Adam state and nothing else.
"""

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .diffusion import UQDM
from .errors import UQDMError
from .hyperparameters import build_model, model_arguments
from .network import NetworkConfig
from .options import RELEASED_WEIGHTS
from .weights import lightning_checkpoint, safe_load

try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _np_scalar

# The only non-torch globals in the released checkpoints (NumPy scalars in the Adam state). The
# scalar constructor is pickled as ``numpy.core.multiarray.scalar`` by NumPy 1, ``numpy._core...`` by 2.
NUMPY_GLOBALS = [
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),
]
RENAMED = {"dropout_prob": "dropout"}  # config["model"] names that differ from uqdm's
OPTIM_KEYS = ("lr", "beta1", "eps", "weight_decay", "warmup")  # config["optim"], same names as uqdm's


def read_released(directory) -> tuple[dict, dict]:
    """``(config, checkpoint)`` of a released model folder, the checkpoint read weights-only."""
    directory = Path(directory)
    config_path, checkpoint_path = directory / "config.json", directory / "checkpoint.pt"
    for p in (config_path, checkpoint_path):
        if not p.is_file():
            raise UQDMError(f"released model folder {directory} has no {p.name}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UQDMError(f"{config_path} is not valid JSON: {e}") from e
    return config, safe_load(checkpoint_path, allowed_globals=NUMPY_GLOBALS)


def hparams_from_config(config: dict) -> dict:
    """uqdm's flat hyperparameters (`UQDMModule`'s arguments) from a released ``config.json``."""
    model, optim = config.get("model"), config.get("optim", {})
    if not isinstance(model, dict) or not isinstance(optim, dict):
        raise UQDMError("config.json has no 'model' section")
    if model.get("vocab_size", 256) != 256:
        raise UQDMError(f"config.json: vocab_size {model['vocab_size']} is not supported (only 256)")
    hparams = model_arguments({RENAMED.get(key, key): value for key, value in model.items()})
    hparams.update({key: optim[key] for key in OPTIM_KEYS if key in optim})
    return hparams


def network_config(config: dict) -> NetworkConfig:
    """The score network's hyperparameters from a released ``config.json``."""
    hparams = hparams_from_config(config)
    return NetworkConfig(**{f.name: hparams[f.name] for f in fields(NetworkConfig) if f.name in hparams})


def _load_ema(model: UQDM, checkpoint: dict) -> None:
    """Copy `ema.shadow_params` onto the network's and then the schedule's parameters, in order."""
    try:
        shadow = checkpoint["ema"]["shadow_params"]
    except (KeyError, TypeError):
        raise UQDMError("checkpoint.pt has no ema.shadow_params; import it with --weights raw") from None
    params = list(model.network.parameters()) + list(model.schedule.parameters())
    if len(shadow) != len(params):
        raise UQDMError(f"checkpoint.pt: ema holds {len(shadow)} tensors, "
                        f"the configured model has {len(params)} parameters")
    with torch.no_grad():
        for i, (p, s) in enumerate(zip(params, shadow)):
            if not isinstance(s, torch.Tensor) or s.shape != p.shape:
                shape = tuple(getattr(s, "shape", ()))
                raise UQDMError(f"checkpoint.pt: ema entry {i} has shape {shape}, expected {tuple(p.shape)}")
            p.copy_(s)


def _load_raw(model: UQDM, checkpoint: dict) -> None:
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise UQDMError("checkpoint.pt has no 'model' state dict")
    try:
        model.network.load_state_dict(state)
    except RuntimeError as e:
        raise UQDMError(f"checkpoint.pt does not fit the configured network: {str(e).splitlines()[0]}") from None


def load_released(directory, weights: str = "ema") -> tuple[UQDM, dict, int]:
    """The released model in `directory` (eval mode), its flat hyperparameters and its training step."""
    if weights not in RELEASED_WEIGHTS:
        raise UQDMError(f"--weights must be one of {RELEASED_WEIGHTS}, got {weights!r}")
    config, checkpoint = read_released(directory)
    if not isinstance(checkpoint, dict):
        raise UQDMError(f"{directory}/checkpoint.pt is not a dict of weights")
    hparams = hparams_from_config(config)
    try:
        model = build_model(**model_arguments(hparams))
    except (TypeError, ValueError) as e:
        raise UQDMError(f"config.json describes no valid model: {e}") from None
    (_load_ema if weights == "ema" else _load_raw)(model, checkpoint)
    return model.eval(), hparams, int(checkpoint.get("step", 0))


def import_official(directory, weights: str = "ema") -> dict:
    """The released model in `directory` as a uqdm checkpoint dict (`uqdm.weights.lightning_checkpoint`),
    which `uqdm.weights.load_model`, ``UQDMModule.load_from_checkpoint`` and ``--ckpt_path`` read."""
    model, hparams, step = load_released(directory, weights)
    return lightning_checkpoint(model, hparams, step)
