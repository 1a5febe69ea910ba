"""`mcbeit-tokenizer`: `train` a VQ-VAE tokenizer of one's own (also `run_tokenizer_training.py`) or, with
`--tokenizer_type vqkd`, BEiT v2's VQ-KD (also `mcbeit-vqkd` and `run_vqkd_training.py`), `inspect` any
tokenizer (token maps, reconstructions, codebook usage)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mcbeit.cli.common import config_parser, parse_and_run, run_in_process, to_config
from mcbeit.config.fields import add_arguments, embedded_values
from mcbeit.config.tokenizer import TokenizerInspectConfig, TokenizerTrainConfig
from mcbeit.config.vqkd import VQKDTrainConfig

EMBEDDED_DEFAULTS = embedded_values(TokenizerTrainConfig)
TRAIN_DESCRIPTION = (
    "Train a VQ-VAE tokenizer (f8: 14x14 tokens for a 112 px input) usable in pre-training as "
    "--discrete_vae_type customized --discrete_vae_weight_path <output_dir>/checkpoint-<epoch>.pth (or "
    "<output_dir>/tokenizer.pth). With no flags: 1024 codes on the embedded images, a few minutes on a CPU.")
VQKD_DESCRIPTION = (
    "Train BEiT v2's VQ-KD tokenizer (unilm run_vqkd_training.py's flags): a ViT encoder whose l2-normalised codes "
    "(EMA codebook, k-means initialised) are decoded into a teacher's patch features (CLIP, DINO or any timm model "
    "given as a weights file). A checkpoint-<epoch>.pth is usable as --tokenizer_weight in BEiT v2 pre-training. "
    "With no flags: a tiny VQ-KD on the embedded images with a RANDOM tiny teacher (a demonstration). Differences "
    "from the original, on purpose: the teacher comes from --teacher_weight (nothing downloads); the k-means "
    "initialisation is rank 0's, broadcast (the original's ranks each run their own and never synchronise); the "
    "codebook's EMA update follows the optimizer step (the same arithmetic; a skipped step leaves it alone); the "
    "teacher's input is resized to --teacher_input_size; --dead_code_steps re-seeds dead codes (off, as the "
    "original).")
TOKENIZER_TYPES = ("vqvae", "vqkd")
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
    for name, cls, text, description in (("train", TokenizerTrainConfig, "train a VQ-VAE (or, with --tokenizer_type "
                                          "vqkd, a VQ-KD) tokenizer", TRAIN_DESCRIPTION),
                                         ("inspect", TokenizerInspectConfig,
                                          "token maps, reconstructions and codebook usage", INSPECT_DESCRIPTION)):
        add_arguments(sub.add_parser(name, help=text, description=description), cls)
        sub.choices[name].set_defaults(_config_class=cls)
    sub.choices["train"].add_argument("--tokenizer_type", choices=TOKENIZER_TYPES, default=argparse.SUPPRESS,
                                      help="vqvae: the VQ-VAE below (default); vqkd: BEiT v2's VQ-KD, whose flags are "
                                           "mcbeit-vqkd's (see mcbeit-vqkd --help); main() takes it out before parsing (default: vqvae)")
    return parser


def _split_tokenizer_type(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--tokenizer_type X`` (or ``=X``) taken out of ``argv``: (X or 'vqvae', the other arguments)."""
    kind, rest, args = "vqvae", [], list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--tokenizer_type" and i + 1 < len(args):
            kind, i = args[i + 1], i + 2
            continue
        if a.startswith("--tokenizer_type="):
            kind = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if kind not in TOKENIZER_TYPES:
        raise SystemExit(f"--tokenizer_type {kind!r}: choose one of {', '.join(TOKENIZER_TYPES)}")
    return kind, rest


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


def get_vqkd_parser() -> argparse.ArgumentParser:
    return config_parser("mcbeit-vqkd", VQKDTrainConfig, VQKD_DESCRIPTION)


def train_vqkd(config: VQKDTrainConfig) -> dict:
    """Train a VQ-KD tokenizer as ``config`` says; return the last epoch's record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.vqkd import VQKDTrainingTask

    stats = Trainer(config, VQKDTrainingTask(config)).fit()
    if stats and config.output_dir:
        logging.getLogger("mcbeit.vqkd").info(
            "use it with --tokenizer_weight %s/checkpoint-<epoch>.pth (or --discrete_vae_type vqkd "
            "--discrete_vae_weight_path ...)", config.output_dir)
    return stats


def resolve_defaults(args: argparse.Namespace) -> VQKDTrainConfig:
    """The frozen configuration of a parsed `mcbeit-vqkd` command line."""
    return to_config(args, VQKDTrainConfig)


def run_vqkd(args: argparse.Namespace) -> dict:
    """Run a parsed `mcbeit-vqkd` command line in this process."""
    return run_in_process(train_vqkd, args, VQKDTrainConfig)


def main_vqkd(argv: Sequence[str] | None = None) -> int:
    """`mcbeit-vqkd` and `run_vqkd_training.py` (and `mcbeit-tokenizer train --tokenizer_type vqkd`)."""
    return parse_and_run(get_vqkd_parser(), argv, train_vqkd)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "train":
        kind, rest = _split_tokenizer_type(args[1:])
        if kind == "vqkd":
            return main_vqkd(rest)
        argv = ["train", *rest]
    parser = get_args_parser()
    command = parser.parse_args(argv).command
    job = train if command == "train" else inspect
    return parse_and_run(parser, argv, job)


def main_train(argv: Sequence[str] | None = None) -> int:
    """`run_tokenizer_training.py`: the `train` subcommand's flags, without the subcommand."""
    return parse_and_run(get_train_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
