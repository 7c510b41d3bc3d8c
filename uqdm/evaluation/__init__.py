"""Progressive evaluation: rate and distortion at every truncation point, during training (the
`ProgressiveMetrics` callback) and as the `uqdm evaluate` command, next to classical codecs.

The names below load on first use, so that `uqdm plot` (which reads results files) imports
neither torch nor Lightning.
"""

from uqdm.lazy import lazy_exports

_EXPORTS = {
    "ProgressiveMetrics": ".callback",
    "Progression": ".progressive",
    "SharedNoise": ".progressive",
    "bd_rate": ".bdrate",
    "point_names": ".progressive",
    "progressive_chain": ".progressive",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
