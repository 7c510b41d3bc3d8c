"""Online or offline W&B, decided as W&B itself would find an account: runs are offline (in the
run folder's `wandb/`, syncable later with `wandb sync`) only where W&B has no mode and no API key
for its server, so nothing ever prompts. Reads environment variables and files only.

W&B's configuration, in its own order: the environment (`WANDB_MODE`, `WANDB_API_KEY`,
`WANDB_BASE_URL`), then the settings files' `[default]` section (`mode`, `base_url`, `api_key`;
the workspace file `$WANDB_DIR/wandb/settings`, default `./wandb/settings`, over the global
`$WANDB_CONFIG_DIR/settings`, default `~/.config/wandb/settings`), then the netrc file (`$NETRC`,
else `~/.netrc`, else `~/_netrc`) entry of the server's host. A self-hosted server (`base_url`)
counts as configured when its host has a key.
"""

import configparser
import netrc
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

# The hosts of W&B's own server: its API, and the CoreWeave Forge proxy in front of it (W&B ≥ 0.31).
SAAS_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or Path.home())


def settings(environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """The `[default]` entries of W&B's settings files, the workspace file's over the global one's."""
    config_dir = environ.get("WANDB_CONFIG_DIR")
    global_file = Path(config_dir).expanduser() if config_dir else _home(environ) / ".config" / "wandb"
    root = Path(environ.get("WANDB_DIR") or cwd).expanduser()
    workspace = root / (".wandb" if (root / ".wandb").exists() else "wandb")
    found: dict[str, str] = {}
    for path in (global_file / "settings", workspace / "settings"):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # W&B, too, treats an unreadable settings file as empty
        if parser.has_section("default"):
            found.update(parser["default"])
    return found


def netrc_has_key(environ: Mapping[str, str], hosts: tuple[str, ...]) -> bool:
    """Whether the netrc file that W&B reads holds a password for one of `hosts`."""
    path = environ.get("NETRC")
    if path:
        path = Path(path).expanduser()
    else:
        candidates = [_home(environ) / ".netrc", _home(environ) / "_netrc"]
        path = next((p for p in candidates if p.exists()), None)
    if path is None:
        return False
    try:
        entries = netrc.netrc(os.fspath(path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entries.authenticators(host) or (None, None, None))[2] for host in hosts)


def offline_needed(environ: Mapping[str, str], cwd: Path | None = None) -> bool:
    """True where W&B has neither a mode nor an API key for its server (see the module docstring)."""
    if environ.get("WANDB_MODE") or environ.get("WANDB_API_KEY"):
        return False
    found = settings(environ, Path.cwd() if cwd is None else cwd)
    if found.get("mode") or found.get("api_key"):
        return False
    base_url = environ.get("WANDB_BASE_URL") or found.get("base_url")
    hosts = (urlsplit(base_url).netloc,) if base_url else SAAS_HOSTS
    return not netrc_has_key(environ, hosts)


def offline_without_account(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `WANDB_MODE=offline` where `offline_needed`; leave W&B's own choice alone elsewhere."""
    if offline_needed(environ):
        environ["WANDB_MODE"] = "offline"
