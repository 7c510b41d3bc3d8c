"""Seeded randomness that does not disturb the global generators."""

from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int):
    """Run a block with a fixed seed on the CPU and the current CUDA device, then restore the RNG."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
