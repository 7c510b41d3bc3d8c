"""The model's hyperparameters, declared once, and the diffusion model they describe.

`build_model` is where they are declared: the diffusion's as its arguments, the network's as the
fields of `NetworkConfig`. `UQDMModule` forwards its model arguments here (LightningCLI reads them
through the forwarding, so ``--model.embedding_dim=64`` works), checkpoints store them flat under
``hyper_parameters``, and `uqdm.weights.load_model` rebuilds the model from them without Lightning.
"""

import inspect
from dataclasses import fields

from .diffusion import DIFFUSIONS, UQDM, DiscreteDiffusion, GaussianDiffusion
from .network import NetworkConfig, ScoreNetwork
from .schedules import make_schedule


def build_model(
    n_timesteps: int = 4,
    diffusion: str = "uniform",
    prior_type: str = "logistic",
    base_prior_scale: str = "forward_kernel",
    clip_prior_mean: bool = True,
    noise_schedule: str = "learned_linear",
    fix_gamma_max: bool = True,
    **network,
) -> DiscreteDiffusion:
    """A UQDM (or its Gaussian twin) with a fresh `ScoreNetwork` and noise schedule.

    Args:
        n_timesteps: number of diffusion steps T.
        diffusion: "uniform" (UQDM) or "gaussian" (the comparison whose rate is theoretical).
        prior_type: "logistic" or "normal" (Gaussian diffusion is always normal).
        base_prior_scale: "forward_kernel" or "default".
        clip_prior_mean: centre the prior at the posterior mean of the clipped prediction x̂.
        noise_schedule: "fixed_linear" or "learned_linear"; from `gamma_min` to `gamma_max`.
        fix_gamma_max: keep γ(1) at `gamma_max` while learning the schedule.
        **network: the fields of `uqdm.network.NetworkConfig`.

    Raises:
        ValueError: an unknown choice; TypeError: an unknown network field.
    """
    if diffusion not in DIFFUSIONS:
        raise ValueError(f"unknown diffusion {diffusion!r}; choose one of {DIFFUSIONS}")
    config = NetworkConfig(**network)
    schedule = make_schedule(noise_schedule, config.gamma_min, config.gamma_max, fix_gamma_max)
    objective = UQDM if diffusion == "uniform" else GaussianDiffusion
    return objective(
        ScoreNetwork(config),
        schedule,
        n_timesteps=n_timesteps,
        prior_type="normal" if diffusion == "gaussian" else prior_type,
        base_prior_scale=base_prior_scale,
        clip_prior_mean=clip_prior_mean,
    )


# Every argument `build_model` takes, the network's fields included.
MODEL_ARGUMENTS = (
    *(p.name for p in inspect.signature(build_model).parameters.values() if p.kind != p.VAR_KEYWORD),
    *(f.name for f in fields(NetworkConfig)),
)


def model_arguments(hparams: dict) -> dict:
    """The entries of `hparams` that `build_model` takes (a checkpoint's also hold the optimiser's)."""
    return {name: value for name, value in hparams.items() if name in MODEL_ARGUMENTS}
