"""The `uqdm` (and `lightning`) command: LightningCLI for fit/validate/test, plus the codec and
evaluation tools. Argument parsing and error messages only; the work happens in the modules."""

import argparse
import importlib
import netrc
import os
import sys

from .errors import UQDMError

# Tool subcommands -> the module whose `register(subparsers)` adds them (setting `run` on each).
TOOLS = {
    "import-official": "uqdm.codec.commands",
    "compress": "uqdm.codec.commands",
    "decompress": "uqdm.codec.commands",
    "truncate": "uqdm.codec.commands",
    "info": "uqdm.codec.commands",
    "evaluate": "uqdm.evaluation.commands",
    "sweep-local": "uqdm.sweeps",
}


def wandb_offline_without_account() -> None:
    """Run W&B offline (runs land in ./wandb, syncable later) unless an account is configured."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"


def lightning_main(argv: list[str] | None) -> None:
    """LightningCLI over `UQDMModule` and any LightningDataModule, configs parsed by OmegaConf."""
    import lightning as L
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from .module import UQDMModule

    wandb_offline_without_account()
    # omegaconf+: interpolations such as ${model.n_timesteps} resolve after command-line overrides
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    LightningCLI(
        UQDMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def tools_parser(command: str) -> argparse.ArgumentParser:
    """The parser of the module that provides `command` (only that module is imported)."""
    parser = argparse.ArgumentParser(prog="uqdm")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    importlib.import_module(TOOLS[command]).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `uqdm`, `lightning` and `python -m uqdm`; `argv` defaults to sys.argv[1:]."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] in TOOLS:
            tool_args = tools_parser(args[0]).parse_args(args)
            tool_args.run(tool_args)
        else:
            lightning_main(argv)
    except UQDMError as error:
        print(f"uqdm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("uqdm: interrupted", file=sys.stderr)
        sys.exit(130)
