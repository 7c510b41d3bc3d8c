"""Commands over many inputs: a bad input is reported in one line and the others go on.

`BatchJob` counts what failed; it ends with a summary line, and with exit code 2 (a `UQDMError`)
when anything failed. With a single input, its failure is the command's error, as before.
`BatchJob.run` works on several inputs at once on threads and still reports each input's warnings
and failure in input order, holding at most two inputs per thread in flight.
"""

import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from .errors import UQDMError

_working = threading.local()  # .caught: the warnings of the input this thread works on


def warn(message: str) -> None:
    """Print `uqdm: warning: <message>` on stderr."""
    print(f"uqdm: warning: {message}", file=sys.stderr, flush=True)


def _route(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` while `BatchJob.run` works: to the input of the warning's thread."""
    caught = getattr(_working, "caught", None)
    if caught is None:
        warn(str(message))
    else:
        caught.append(str(message))


def _outcome(work: Callable[[int], None], i: int) -> tuple[list[str], UQDMError | None]:
    """Run `work(i)`: the messages of the warnings it raised, and its `UQDMError` if it failed."""
    _working.caught = caught = []
    try:
        work(i)
    except UQDMError as error:
        return caught, error
    finally:
        del _working.caught
    return caught, None


class BatchJob:
    """The outcome of a command over `total` inputs; `verb` says what happened to the good ones."""

    def __init__(self, total: int, verb: str):
        self.total, self.verb, self.failed = total, verb, 0

    def fail(self, error: UQDMError, name: str = "") -> None:
        """Report one input's failure as a `uqdm: error:` line that names it (raise the error
        unchanged when it is the only input)."""
        if self.total == 1:
            raise error
        self.failed += 1
        text = str(error) if name in str(error) else f"{name}: {error}"
        print(f"uqdm: error: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def item(self, name: str):
        """A block working on the input `name`: a `UQDMError` in it is that input's failure."""
        try:
            yield
        except UQDMError as error:
            self.fail(error, name)

    def run(self, names: Sequence[str], work: Callable[[int], None], workers: int = 1) -> None:
        """`work(i)` for each input i, on `workers` threads (1: on this one). Each input's warnings
        (`uqdm: warning: <name>: ...`, the name only with several inputs) and failure are reported
        in input order as its work ends."""
        prefix = (lambda name: f"{name}: ") if self.total > 1 else (lambda name: "")

        def report(i: int, outcome: tuple[list[str], UQDMError | None]) -> None:
            caught, error = outcome
            for message in dict.fromkeys(caught):
                warn(f"{prefix(names[i])}{message}")
            if error is not None:
                self.fail(error, names[i])

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _route
            if workers <= 1:
                for i in range(len(names)):
                    report(i, _outcome(work, i))
                return
            pool, pending = ThreadPoolExecutor(workers), deque()

            def oldest() -> None:
                i, future = pending.popleft()
                report(i, future.result())

            try:
                for i in range(len(names)):
                    pending.append((i, pool.submit(_outcome, work, i)))
                    if len(pending) == 2 * workers:
                        oldest()
                while pending:
                    oldest()
            finally:
                pool.shutdown(cancel_futures=True)

    def finish(self) -> None:
        """`N files <verb>` when all went well (with several inputs); else a `UQDMError` counting
        the failures."""
        if self.failed:
            raise UQDMError(f"{self.failed} of {self.total} inputs failed; {self.total - self.failed} {self.verb}")
        if self.total > 1:
            print(f"{self.total} inputs {self.verb}")
