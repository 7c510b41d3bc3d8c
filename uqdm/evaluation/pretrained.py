"""Pretrained weights that an optional metric needs (FID's Inception, LPIPS's AlexNet): found at a
path, else fetched there once; offline without them the metric is off, with one warning."""

import os
from pathlib import Path

import torch


class WeightsUnavailable(Exception):
    """The weights can be neither found nor downloaded; the message says what is off and how to fix it."""


def default_weights_path(url: str) -> Path:
    """Where torch.hub caches downloads (`$TORCH_HOME/hub/checkpoints`), under the release's file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def fetch_weights(url: str, path: str | os.PathLike | None, metric: str, option: str) -> Path:
    """The weights file at `path` (default: `default_weights_path(url)`), downloaded from `url`
    when absent.

    Raises:
        WeightsUnavailable: absent and not downloadable (offline, proxy, permissions); its message
            starts with "`metric` is off" and names the file and `option`, which takes its path.
    """
    path = Path(path) if path is not None else default_weights_path(url)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, os.fspath(path), progress=False)
        except Exception as e:  # offline, proxy, permissions: all mean "not this time"
            raise WeightsUnavailable(
                f"{metric} is off: no weights at {path} and downloading them failed ({type(e).__name__}: {e}); "
                f"put {url.rsplit('/', 1)[-1]} (from {url}) there or pass its path as {option}"
            ) from e
    return path
