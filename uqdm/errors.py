"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UQDMError(Exception):
    """A problem with the user's input (file, image, checkpoint, data), not a bug in uqdm."""
