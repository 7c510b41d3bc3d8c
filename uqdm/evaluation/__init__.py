"""Progressive evaluation: rate and distortion at every truncation point, during training (the
`ProgressiveMetrics` callback) and as the `uqdm evaluate` command, next to classical codecs.

The names below load on first use, so that `uqdm plot` (which reads results files) imports
neither torch nor Lightning.
"""

import importlib

_EXPORTS = {
    "ProgressiveMetrics": ".callback",
    "Progression": ".progressive",
    "SharedNoise": ".progressive",
    "bd_rate": ".bdrate",
    "point_names": ".progressive",
    "progressive_chain": ".progressive",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
