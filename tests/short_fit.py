"""The config of the short, deterministic CPU training runs that the resume tests kill and resume."""

import yaml

from uqdm.codec.fuzz import TINY


def short_fit_config(steps: int, callbacks: list[dict], trainer: dict | None = None, data: dict | None = None,
                     model: dict | None = None) -> str:
    """YAML for `uqdm fit --config`: the tiny module (lr 10⁻³, 3 warm-up steps, gradients clipped to
    norm 1, the `model` options added) trained for `steps` steps on the CPU, deterministically,
    validating every 2 steps, with `callbacks`, the `trainer` settings added (a logger, plugins) and
    the `data` section if given."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
            "deterministic": True, "enable_progress_bar": False, "enable_model_summary": False,
            **(trainer or {}), "callbacks": callbacks,
        },
        "model": {**TINY, "lr": 1.0e-3, "warmup": 3, "gradient_clip_val": 1.0, **(model or {})},
    }
    if data is not None:
        config["data"] = data
    return yaml.safe_dump(config, sort_keys=False)
