"""A disk that fills up, for the full-disk tests: a writer made to fail, and a training callback
that fills the checkpoints' disk (a real one with a filler file, or through that writer)."""

import errno
import os

from lightning.pytorch import Callback

import uqdm.atomic


class FillingFile:
    """A file that takes `room[0]` more bytes (shared by all such files), then fails as a full disk
    does: it writes what fits and raises ENOSPC."""

    def __init__(self, f, room: list[int]):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room[0]:
            self._f.write(bytes(data[: self._room[0]]))
            self._room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_atomic_writes(room: int, setattr=setattr) -> None:
    """From now on every file `uqdm.atomic` writes can take `room` more bytes in all (`setattr`: a
    pytest monkeypatch's, to undo it after a test)."""
    left, fdopen = [room], os.fdopen
    setattr(uqdm.atomic.os, "fdopen", lambda fd, *a, **k: FillingFile(fdopen(fd, *a, **k), left))


class FillDisk(Callback):
    """After the first checkpoint (step 2; Lightning runs checkpoint callbacks last), leaves
    $FILL_TO_BYTES bytes for the checkpoints: on their filesystem (a filler file), or with
    FILL=writer, through `FillingFile`."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != 3:
            return
        room, folder = int(os.environ["FILL_TO_BYTES"]), trainer.checkpoint_callback.dirpath
        if os.environ.get("FILL") == "writer":
            fill_atomic_writes(room)
        else:
            stat = os.statvfs(folder)
            with open(f"{folder}/filler", "wb") as f:
                f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - room))
