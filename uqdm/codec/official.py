"""`uqdm import-official`: a released model folder (`config.json` + `checkpoint.pt`) as a uqdm checkpoint.

The released `checkpoint.pt` holds the raw network weights under `model` and the exponential
moving average of all trainable parameters under `ema.shadow_params`: the network's parameters in
order, then the schedule's (`w`). `ema` imports that average, network *and* schedule; `raw` imports
the raw network and keeps the initial schedule, since the raw `w` is stored nowhere.
"""

import io

import lightning
import torch

from uqdm.atomic import write_atomic
from uqdm.checkpoints import OFFICIAL_NETWORK_KEYS, load_official
from uqdm.errors import UQDMError
from uqdm.module import UQDMModule
from uqdm.options import RELEASED_WEIGHTS

# released config["model"] key -> UQDMModule argument: the network's keys plus the diffusion's
MODEL_KEYS = {
    **OFFICIAL_NETWORK_KEYS,
    **{key: key for key in ("n_timesteps", "prior_type", "base_prior_scale", "noise_schedule", "fix_gamma_max")},
}
OPTIM_KEYS = ("lr", "beta1", "eps", "weight_decay", "warmup")  # released config["optim"], same names


def hparams_from_config(config: dict) -> dict:
    """`UQDMModule` arguments from a released `config.json` (model and optimiser sections)."""
    model, optim = config.get("model"), config.get("optim", {})
    if not isinstance(model, dict) or not isinstance(optim, dict):
        raise UQDMError("config.json has no 'model' section")
    if model.get("vocab_size", 256) != 256:
        raise UQDMError(f"config.json: vocab_size {model['vocab_size']} is not supported (only 256)")
    hparams = {ours: model[theirs] for theirs, ours in MODEL_KEYS.items() if theirs in model}
    hparams.update({key: optim[key] for key in OPTIM_KEYS if key in optim})
    return hparams


def _load_ema(module: UQDMModule, checkpoint: dict) -> None:
    """Copy `ema.shadow_params` onto the network's and then the schedule's parameters, in order."""
    try:
        shadow = checkpoint["ema"]["shadow_params"]
    except (KeyError, TypeError):
        raise UQDMError("checkpoint.pt has no ema.shadow_params; import it with --weights raw") from None
    params = list(module.model.network.parameters()) + list(module.model.schedule.parameters())
    if len(shadow) != len(params):
        raise UQDMError(f"checkpoint.pt: ema holds {len(shadow)} tensors, "
                        f"the configured model has {len(params)} parameters")
    with torch.no_grad():
        for i, (p, s) in enumerate(zip(params, shadow)):
            if not isinstance(s, torch.Tensor) or s.shape != p.shape:
                shape = tuple(getattr(s, "shape", ()))
                raise UQDMError(f"checkpoint.pt: ema entry {i} has shape {shape}, expected {tuple(p.shape)}")
            p.copy_(s)


def _load_raw(module: UQDMModule, checkpoint: dict) -> None:
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise UQDMError("checkpoint.pt has no 'model' state dict")
    try:
        module.model.network.load_state_dict(state)
    except RuntimeError as e:
        raise UQDMError(f"checkpoint.pt does not fit the configured network: {str(e).splitlines()[0]}") from None


def import_official(directory, weights: str = "ema") -> dict:
    """A Lightning-style checkpoint dict of the released model in `directory`.

    Returns `{"state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step"}`,
    loadable by `uqdm.checkpoints.load_module` and `UQDMModule.load_from_checkpoint`.
    """
    if weights not in RELEASED_WEIGHTS:
        raise UQDMError(f"--weights must be one of {RELEASED_WEIGHTS}, got {weights!r}")
    config, checkpoint = load_official(directory)
    if not isinstance(checkpoint, dict):
        raise UQDMError(f"{directory}/checkpoint.pt is not a dict of weights")
    hparams = hparams_from_config(config)
    try:
        module = UQDMModule(**hparams)
    except (TypeError, ValueError) as e:
        raise UQDMError(f"config.json describes no valid model: {e}") from None
    (_load_ema if weights == "ema" else _load_raw)(module, checkpoint)
    return lightning_checkpoint(module, int(checkpoint.get("step", 0)))


def lightning_checkpoint(module: UQDMModule, global_step: int = 0) -> dict:
    """The minimal checkpoint dict that `UQDMModule.load_from_checkpoint` and `load_module` read."""
    return {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": global_step,
    }


def save_checkpoint(checkpoint: dict, path) -> None:
    """`torch.save` the checkpoint to `path` atomically."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getvalue())
