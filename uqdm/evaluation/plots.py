"""Rate-distortion plots: PSNR against bits per pixel, one curve per method or codec.

Figures are drawn on their own Agg canvas (no pyplot state, no window, nothing to close).
"""

import io
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def rd_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float | None]]], title: str) -> Figure:
    """One marked line per curve `name -> (bpp, psnr)`; points without a finite PSNR (exact
    pictures) are left out. UQDM curves (names starting with "UQDM") are solid and bold, the others
    dashed; every curve has its own marker, so overlapping curves stay visible."""
    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (name, (bpp, psnr)), marker in zip(curves.items(), itertools.cycle(MARKERS)):
        kept = [(b, p) for b, p in zip(bpp, psnr) if p is not None and np.isfinite(p)]
        if kept:
            xs, ys = zip(*kept)
            uqdm = name.startswith("UQDM")
            ax.plot(xs, ys, marker=marker, markersize=6 if uqdm else 4, fillstyle="none" if uqdm else "full",
                    linestyle="-" if uqdm else "--", linewidth=2 if uqdm else 1, label=name)
    ax.set_title(title)
    ax.set_xlabel("bits per pixel (bpp)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_array(fig: Figure) -> np.ndarray:
    """The figure as an H×W×3 uint8 array (what loggers' `log_image` takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
