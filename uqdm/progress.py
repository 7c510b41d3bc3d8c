"""The codec commands' progress bar: the steps coded or decoded, and the windows of the network
pass in progress.

The bar counts an input's step as one unit: `uqdm compress` of N images of K chunks each runs to
N·K. Within a step it shows the windows the score network has run of the pass under way against
the pass's own total (`windows.Windowed`: coding a step is one pass, over more windows than tiles
on the shifted grid's odd steps; every picture of a lossy point is one or more passes of its own).
It is drawn on stderr only when stderr is a terminal and `--quiet` is not given (`visible`);
otherwise nothing at all is written by it, so scripts and pipes see the commands' plain output.
While it is drawn, the command's own lines (stdout and stderr) are written above it.
"""

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm

REDRAW_SECONDS = 0.1  # the window count is redrawn at most this often


def visible(quiet: bool, stream=None) -> bool:
    """Whether to draw a bar: not `quiet`, and `stream` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and isatty is not None and isatty()


class Progress:
    """A bar over `total` steps (one input's step each), or nothing when not `visible`; a context
    manager, inside which codec calls report through `task`, from any thread."""

    def __init__(self, total: int, description: str, quiet: bool):
        self.shown = visible(quiet)
        self._lock, self._drawn = threading.Lock(), 0.0
        self._bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True,
                         leave=False, disable=not self.shown)

    def _advance(self, steps: int) -> None:
        """Move by `steps` and redraw (tqdm alone redraws at most every 0.1 s)."""
        if steps:
            with self._lock:
                self._bar.update(steps)
                self._draw()

    def _draw(self) -> None:
        self._bar.refresh()
        self._drawn = time.monotonic()

    @contextlib.contextmanager
    def task(self, inputs: int, chunks: int) -> Iterator[tuple[Callable[[int], None], Callable[[int, int], None]]]:
        """A codec call over `inputs` inputs of `chunks` chunks: yields its `on_chunk(c)` and
        `on_windows(done, total)` callbacks. The bar advances by `inputs` per chunk and shows the
        windows of the network pass under way (redrawn at most every REDRAW_SECONDS); when the call
        ends the bar has advanced by inputs·chunks in all, and when it fails it goes back to where
        it was."""
        seen = 0

        def on_chunk(c: int) -> None:
            nonlocal seen
            if c > seen:
                with self._lock:
                    self._bar.set_postfix_str("", refresh=False)
                self._advance(inputs * (min(c, chunks) - seen))
                seen = min(c, chunks)

        def on_windows(done: int, total: int) -> None:
            with self._lock:
                self._bar.set_postfix_str(f"windows {done}/{total}", refresh=False)
                if time.monotonic() - self._drawn >= REDRAW_SECONDS:
                    self._draw()

        try:
            yield on_chunk, on_windows
        except BaseException:
            self._advance(-inputs * seen)
            raise
        self._advance(inputs * (chunks - seen))

    def __enter__(self) -> "Progress":
        """While the bar is drawn, what the command prints to stdout and stderr goes above it."""
        self._streams = sys.stdout, sys.stderr
        if self.shown:
            sys.stdout, sys.stderr = (_Above(stream, self._bar) for stream in self._streams)
        return self

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Above):
                stream.close()
        sys.stdout, sys.stderr = self._streams
        self._bar.close()


class _Above:
    """A text stream whose whole lines are written above a bar: the bar is cleared, the lines are
    written and the bar is drawn again."""

    def __init__(self, stream, bar: tqdm):
        self._stream, self._bar, self._partial = stream, bar, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            with self._bar.external_write_mode(file=self._bar.fp):
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        """Write what is left of a line (the stream itself stays open)."""
        if self._partial:
            self.write("\n")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
