"""`mcbeit-tokenizer`: `train` a VQ-VAE tokenizer of one's own (also `run_tokenizer_training.py`),
`inspect` any tokenizer (token maps, reconstructions, codebook usage)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mcbeit.cli.common import config_parser, parse_and_run, run_in_process, to_config
from mcbeit.config.fields import add_arguments, embedded_values
from mcbeit.config.tokenizer import TokenizerInspectConfig, TokenizerTrainConfig

EMBEDDED_DEFAULTS = embedded_values(TokenizerTrainConfig)
TRAIN_DESCRIPTION = (
    "Train a VQ-VAE tokenizer (f8: 14x14 tokens for a 112 px input) usable in pre-training as "
    "--discrete_vae_type customized --discrete_vae_weight_path <output_dir>/checkpoint-<epoch>.pth (or "
    "<output_dir>/tokenizer.pth). With no flags: 1024 codes on the embedded images, a few minutes on a CPU.")
INSPECT_DESCRIPTION = ("Look at a tokenizer: image / token-id map / reconstruction grid for a few images, and the "
                       "codebook-usage histogram over a dataset (two PNGs; usage figures in the log).")


def get_train_parser() -> argparse.ArgumentParser:
    return config_parser("mcbeit-tokenizer train", TokenizerTrainConfig, TRAIN_DESCRIPTION)


def get_inspect_parser() -> argparse.ArgumentParser:
    return config_parser("mcbeit-tokenizer inspect", TokenizerInspectConfig, INSPECT_DESCRIPTION)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("mcbeit-tokenizer", description="Train (train) or look at (inspect) a visual "
                                                                      "tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,inspect}")
    for name, cls, text, description in (("train", TokenizerTrainConfig, "train a VQ-VAE tokenizer", TRAIN_DESCRIPTION),
                                         ("inspect", TokenizerInspectConfig,
                                          "token maps, reconstructions and codebook usage", INSPECT_DESCRIPTION)):
        add_arguments(sub.add_parser(name, help=text, description=description), cls)
        sub.choices[name].set_defaults(_config_class=cls)
    return parser


def resolve_train_defaults(args: argparse.Namespace) -> TokenizerTrainConfig:
    """The frozen configuration of a parsed `train` command line."""
    return to_config(args, TokenizerTrainConfig)


def train(config: TokenizerTrainConfig) -> dict:
    """Train a VQ-VAE tokenizer as ``config`` says; return the last epoch's record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.tokenizer import TokenizerTrainingTask

    stats = Trainer(config, TokenizerTrainingTask(config)).fit()
    if stats and config.output_dir:
        logging.getLogger("mcbeit.tokenizer").info(
            "use it with --discrete_vae_type customized --discrete_vae_weight_path %s/tokenizer.pth", config.output_dir)
    return stats


def inspect(config: TokenizerInspectConfig) -> dict:
    from mcbeit.tasks.tokenizer import inspect_tokenizer

    return inspect_tokenizer(config)


def run_train(args: argparse.Namespace) -> dict:
    """Run a parsed `train` command line in this process: wrong input stops with ``SystemExit(message)``."""
    return run_in_process(train, args, TokenizerTrainConfig)


def run_inspect(args: argparse.Namespace) -> dict:
    """Run a parsed `inspect` command line in this process."""
    return run_in_process(inspect, args, TokenizerInspectConfig)


def histogram_path(output):
    from mcbeit.tasks.tokenizer import histogram_path as path

    return path(output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    command = parser.parse_args(argv).command
    job = train if command == "train" else inspect
    return parse_and_run(parser, argv, job)


def main_train(argv: Sequence[str] | None = None) -> int:
    """`run_tokenizer_training.py`: the `train` subcommand's flags, without the subcommand."""
    return parse_and_run(get_train_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
