"""Commands over many inputs: a bad input is reported in one line and the others go on.

`BatchJob` counts what failed; it ends with a summary line, and with exit code 2 (a `UQDMError`)
when anything failed. With a single input, its failure is the command's error, as before.
"""

import sys
from contextlib import contextmanager

from .errors import UQDMError


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

    def finish(self) -> None:
        """`N files <verb>` when all went well (with several inputs); else a `UQDMError` counting
        the failures."""
        if self.failed:
            raise UQDMError(f"{self.failed} of {self.total} inputs failed; {self.total - self.failed} {self.verb}")
        if self.total > 1:
            print(f"{self.total} inputs {self.verb}")
