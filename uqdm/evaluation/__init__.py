"""Progressive evaluation: rate and distortion at every truncation point, during training (the
`ProgressiveMetrics` callback) and as the `uqdm evaluate` command, next to classical codecs."""

from .bdrate import bd_rate
from .callback import ProgressiveMetrics
from .progressive import Progression, SharedNoise, point_names, progressive_chain

__all__ = ["ProgressiveMetrics", "Progression", "SharedNoise", "bd_rate", "point_names", "progressive_chain"]
