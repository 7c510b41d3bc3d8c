"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UQDMError(Exception):
    """A problem with the user's input (file, image, checkpoint, data), not a bug in uqdm."""


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: `MemoryError`, torch's ``OutOfMemoryError`` (CUDA and other devices), or
    the RuntimeError of torch's CPU allocator. Checked by name, so without importing torch."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)
