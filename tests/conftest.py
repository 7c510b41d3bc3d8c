import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared test data folder (released weights, Kodak), next to the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (released UQDM weights and Kodak images)")
    return SHARED_DATA
