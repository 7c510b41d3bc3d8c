"""Each command imports only what it needs: reading a `.uqdm` file's container (`uqdm info`,
`uqdm truncate`) needs neither torch nor NumPy, and the codec (compress, decompress, info with a
model) needs no Lightning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uqdm.codec.container import Header, pack

HEAVY = ("torch", "numpy", "lightning")
HEADER = Header(bytes(8), height=5, width=7, tile=4, n_timesteps=2, layers=1, seed=0)
# Run a command in a fresh interpreter and report which of HEAVY it imported.
PROBE = """
import json, sys
from uqdm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
"""


def imported(*args: str, cwd: Path) -> set[str]:
    """The top-level packages of HEAVY that `uqdm ARGS` imported."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}


@pytest.fixture
def small_file(tmp_path) -> Path:
    path = tmp_path / "f.uqdm"
    path.write_bytes(pack(HEADER, [b"ab", b"cde", b"f"]))
    return path


def test_info_and_truncate_import_neither_torch_nor_numpy_nor_lightning(small_file, tmp_path):
    assert imported("info", str(small_file), cwd=tmp_path) == set()
    assert imported("truncate", str(small_file), "--steps", "1", "-o", "g.uqdm", cwd=tmp_path) == set()
    assert (tmp_path / "g.uqdm").read_bytes() == small_file.read_bytes()[: len(pack(HEADER, [b"ab"]))]


@pytest.mark.parametrize("command", ["compress", "decompress", "import-official"])
def test_codec_help_imports_nothing_heavy(command, tmp_path):
    assert imported(command, "--help", cwd=tmp_path) == set()


def test_compress_and_decompress_import_no_lightning(tmp_path):
    import torch

    from uqdm.hyperparameters import build_model
    from uqdm.images import save_png
    from uqdm.weights import lightning_checkpoint, save_checkpoint

    hparams = {"embedding_dim": 8, "norm_groups": 4, "n_timesteps": 1}
    save_checkpoint(lightning_checkpoint(build_model(**hparams), hparams), tmp_path / "m.ckpt")
    image = torch.arange(3 * 5 * 6, dtype=torch.uint8).reshape(3, 5, 6)
    save_png(image, tmp_path / "a.png")
    assert imported("compress", "--ckpt", "m.ckpt", "a.png", "-o", "a.uqdm", "--tile", "8", cwd=tmp_path) == {"torch", "numpy"}
    assert imported("decompress", "--ckpt", "m.ckpt", "a.uqdm", "-o", "b.png", cwd=tmp_path) == {"torch", "numpy"}
    assert imported("info", "a.uqdm", "--ckpt", "m.ckpt", cwd=tmp_path) == {"torch", "numpy"}
    assert (tmp_path / "b.png").read_bytes() and (tmp_path / "a.uqdm").read_bytes()[:4] == b"UQDM"
