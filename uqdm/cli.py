"""The `uqdm` (and `lightning`) command: LightningCLI for fit/validate/test/predict, plus the codec
and evaluation tools. Argument parsing and error messages only; the work happens in the modules.

`uqdm --help` and an unknown command answer from `COMMANDS` alone, importing no subcommand module."""

import argparse
import importlib
import os
import sys

from .errors import UQDMError

# Every subcommand: the module whose `register(subparsers)` adds it (setting `run`; None: LightningCLI's)
# and its one-line description, shown by `uqdm --help` and at the top of `uqdm COMMAND --help`.
COMMANDS = {
    "fit": (None, "train a model (--config, --model.*, --data.*, --trainer.*; --ckpt_path last resumes)"),
    "validate": (None, "validation losses of a checkpoint (--ckpt_path)"),
    "test": (None, "test losses and progressive metrics of a checkpoint (--ckpt_path)"),
    "predict": (None, "run Lightning's predict loop with a checkpoint"),
    "compress": ("uqdm.codec.commands", "compress images into .uqdm files: lossless, K steps, or a bpp budget"),
    "decompress": ("uqdm.codec.commands", "decode .uqdm files (or prefixes of them) to PNG"),
    "truncate": ("uqdm.codec.commands", "cut a .uqdm file after K chunks or to a byte/bpp budget (no model needed)"),
    "info": ("uqdm.codec.commands", "describe a .uqdm file as JSON (header, layer sizes, ideal bits with --ckpt)"),
    "evaluate": ("uqdm.evaluation.commands", "progressive rate-distortion of a checkpoint next to classical codecs"),
    "import-official": ("uqdm.codec.commands", "turn a released model folder into a uqdm checkpoint"),
    "sweep-local": ("uqdm.sweeps", "run a W&B grid sweep file here, without a W&B server"),
    "plot": ("uqdm.evaluation.overlay", "overlay the RD curves of several runs and print BD-rates"),
}
TOOLS = {name: module for name, (module, _) in COMMANDS.items() if module is not None}


def overview() -> str:
    """What `uqdm --help` prints: every subcommand with its one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join([
        "usage: uqdm COMMAND [options]    (uqdm COMMAND --help: the options of one command)",
        "",
        "Universally Quantized Diffusion Models for progressive image compression.",
        "",
        "commands:",
        *lines,
    ])


def lightning_main(argv: list[str] | None) -> None:
    """LightningCLI over `UQDMModule` and any LightningDataModule, configs parsed by OmegaConf.

    Every checkpoint is read weights-only (`--ckpt_path` of fit/validate/test/predict, and the
    hyperparameters LightningCLI reads from it); a file that needs any other global is refused with
    a one-line error. Checkpoints are written atomically (`AtomicCheckpointIO`, unless the config
    names another CheckpointIO plugin). `fit --ckpt_path last` resumes the newest ``last*.ckpt`` of
    the configured run (`find_last_checkpoint`, also where the checkpoint folder depends on the
    logger's run), and the resumed run continues the interrupted one: its random generators
    (`ResumeState`) and its logger run (W&B id or logger version, unless the config sets one).
    """
    import pickle

    import lightning as L
    from jsonargparse import set_parsing_settings
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.cli import LightningCLI

    from .module import UQDMModule
    from .resume import AtomicCheckpointIO, ResumeState, continue_logger_runs, find_last_checkpoint
    from .wandb_mode import offline_without_account
    from .weights import safe_load

    class UQDMCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            self.resumed_checkpoint = None
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand) if subcommand else None
            ckpt_path = config.get("ckpt_path") if config is not None else None
            if ckpt_path == "last" and subcommand == "fit":
                found = find_last_checkpoint(config.get("trainer") or {})
                if found is not None:
                    config["ckpt_path"] = ckpt_path = str(found)
            if ckpt_path and os.path.isfile(ckpt_path):
                # Before LightningCLI reads hyperparameters from it: refuse a malicious file in one line.
                self.resumed_checkpoint = safe_load(ckpt_path)

        def before_instantiate_classes(self) -> None:
            if self.subcommand == "fit" and self.resumed_checkpoint is not None:
                continue_logger_runs(self.config.fit.get("trainer") or {}, self.resumed_checkpoint)
            self.resumed_checkpoint = None  # the Trainer loads it again; don't hold two copies

        def before_fit(self) -> None:
            UQDMModule.check_trainer(self.trainer)  # before Lightning refuses them with a traceback

        def instantiate_trainer(self, **kwargs):
            plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
            return super().instantiate_trainer(**kwargs)

        def _weights_only(self, run, kwargs: dict):
            if kwargs.get("weights_only") is False:
                raise UQDMError("uqdm loads checkpoints weights-only; --weights_only false is not supported")
            kwargs["weights_only"] = True
            try:
                return run(**kwargs)
            except pickle.UnpicklingError as e:  # read by another CheckpointIO plugin than ours
                lines = str(e).splitlines() or [type(e).__name__]
                reason = next((line for line in lines if "GLOBAL" in line), lines[0]).strip()
                raise UQDMError(f"refusing to load {kwargs.get('ckpt_path')}: {reason}") from e

        # LightningCLI runs `self.<subcommand>` where defined, instead of the Trainer's method.
        def fit(self, **kwargs):
            return self._weights_only(self.trainer.fit, kwargs)

        def validate(self, **kwargs):
            return self._weights_only(self.trainer.validate, kwargs)

        def test(self, **kwargs):
            return self._weights_only(self.trainer.test, kwargs)

        def predict(self, **kwargs):
            return self._weights_only(self.trainer.predict, kwargs)

    offline_without_account()
    # omegaconf+: interpolations such as ${model.n_timesteps} resolve after command-line overrides
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    UQDMCLI(
        UQDMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ResumeState()]},
        args=argv,
    )


def tools_parser(command: str) -> argparse.ArgumentParser:
    """The parser of the module that provides `command` (only that module is imported)."""
    parser = argparse.ArgumentParser(prog="uqdm")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    importlib.import_module(TOOLS[command]).register(subparsers)
    for name, subparser in subparsers.choices.items():
        subparser.description = subparser.description or COMMANDS[name][1]
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `uqdm`, `lightning` and `python -m uqdm`; `argv` defaults to sys.argv[1:]."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(overview(), file=sys.stdout if args else sys.stderr)
            if not args:
                sys.exit(2)
        elif args[0] in TOOLS:
            tool_args = tools_parser(args[0]).parse_args(args)
            tool_args.run(tool_args)
        elif args[0] in COMMANDS or args[0].startswith("-"):
            lightning_main(argv)
        else:
            raise UQDMError(f"unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)} (see uqdm --help)")
    except UQDMError as error:
        print(f"uqdm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("uqdm: interrupted", file=sys.stderr)
        sys.exit(130)
