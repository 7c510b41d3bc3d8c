"""Atomic file writing: a reader (or a crash) never sees a partly written file under its final name.

One helper for every file uqdm writes: checkpoints, PNGs, `.uqdm` files, results. Standard library
only, so that `uqdm truncate` can use it without importing torch.
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UQDMError


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file next to `path` for writing; on success it is flushed to disk and renamed
    to `path` (replacing any previous file in one step); on any error it is deleted and `path` is
    left as it was. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name that no glob for the real files (``*.ckpt``, ``last*``, ``*.png``) matches.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> the mode open() would have given
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def write_atomic(path, data: bytes) -> None:
    """`data` into `path` through `atomic_write`; an OS error (disk full, permissions) is a `UQDMError`."""
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as e:
        raise UQDMError(f"cannot write {path}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
