"""A pseudo-terminal for the tests of progress bars (drawn only when stderr is a terminal)."""

import contextlib
import fcntl
import os
import struct
import sys
import termios
import threading
import time


@contextlib.contextmanager
def terminal_stderr():
    """sys.stderr on a pseudo-terminal (80 columns); yields a function returning what it showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    shown = bytearray()

    def drain() -> None:  # keep the terminal's buffer from filling up
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream, before = open(slave, "w", buffering=1, closefd=False), sys.stderr

    def text() -> str:
        stream.flush()
        time.sleep(0.2)  # for the reader
        return shown.decode(errors="replace")

    sys.stderr = stream
    try:
        yield text
    finally:
        sys.stderr = before
        stream.close()
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
