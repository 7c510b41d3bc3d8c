"""When runs go offline: only where W&B has no mode and no API key for its server, read from
environment variables and the files they name (never the network, never the user's own files)."""

from pathlib import Path

import pytest

from uqdm.wandb_mode import offline_needed, offline_without_account


@pytest.fixture
def env(tmp_path) -> dict:
    """An environment whose home, W&B config folder and W&B folder are empty temporary folders."""
    for name in ("home", "config", "work"):
        (tmp_path / name).mkdir()
    return {"HOME": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
            "WANDB_DIR": str(tmp_path / "work")}


def netrc(path: Path, host: str, password: str = "k" * 40) -> str:
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    return str(path)


def settings(folder: str | Path, **entries) -> None:
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "settings").write_text(f"[default]\n{lines}")


def test_no_mode_and_no_key_is_offline_and_only_then(env, tmp_path):
    assert offline_needed(env, tmp_path)
    assert not offline_needed({**env, "WANDB_MODE": "online"}, tmp_path)
    assert not offline_needed({**env, "WANDB_API_KEY": "k" * 40}, tmp_path)
    changed = dict(env)
    offline_without_account(changed)
    assert changed == {**env, "WANDB_MODE": "offline"}
    kept = {**env, "WANDB_MODE": "disabled"}
    offline_without_account(kept)
    assert kept["WANDB_MODE"] == "disabled"


def test_netrc_keys_count_for_their_host_only(env, tmp_path):
    saas = netrc(tmp_path / "saas.netrc", "api.wandb.ai")
    assert not offline_needed({**env, "NETRC": saas}, tmp_path)
    forge = netrc(tmp_path / "forge.netrc", "api.forge.coreweave.com")  # W&B 0.31's default server
    assert not offline_needed({**env, "NETRC": forge}, tmp_path)
    netrc(Path(env["HOME"]) / ".netrc", "api.wandb.ai")  # the default file, where NETRC is unset
    assert not offline_needed(env, tmp_path)
    # a self-hosted server: its own host's key counts, W&B's does not
    server = {**env, "WANDB_BASE_URL": "https://wandb.example.org:8443"}
    assert offline_needed({**server, "NETRC": saas}, tmp_path)
    assert not offline_needed({**server, "NETRC": netrc(tmp_path / "own.netrc", "wandb.example.org:8443")}, tmp_path)
    assert offline_needed({**env, "NETRC": netrc(tmp_path / "empty.netrc", "api.wandb.ai", '""')}, tmp_path)
    broken = tmp_path / "broken.netrc"
    broken.write_text("machine\n")
    assert offline_needed({**env, "NETRC": str(broken), "HOME": str(tmp_path)}, tmp_path)


def test_the_settings_files_name_the_server_the_key_or_the_mode(env, tmp_path):
    own = netrc(tmp_path / "own.netrc", "wandb.example.org")
    settings(env["WANDB_CONFIG_DIR"], base_url="https://wandb.example.org")  # `wandb login --host`
    assert not offline_needed({**env, "NETRC": own}, tmp_path)
    assert offline_needed({**env, "NETRC": own, "WANDB_BASE_URL": "https://other.example.org"}, tmp_path)
    settings(Path(env["WANDB_DIR"]) / "wandb", base_url="https://other.example.org")  # the workspace wins
    assert offline_needed({**env, "NETRC": own}, tmp_path)
    settings(Path(env["WANDB_DIR"]) / "wandb", mode="offline")  # `wandb offline`: W&B decides itself
    assert not offline_needed(env, tmp_path)
    settings(env["WANDB_CONFIG_DIR"], api_key="k" * 40)
    assert not offline_needed({k: v for k, v in env.items() if k != "WANDB_DIR"}, tmp_path)
    # without WANDB_DIR the workspace is the current folder's wandb/
    settings(tmp_path / "cwd" / "wandb", mode="online")
    assert not offline_needed({"HOME": env["HOME"]}, tmp_path / "cwd")
    assert offline_needed({"HOME": env["HOME"]}, tmp_path)
