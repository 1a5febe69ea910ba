"""`mcbeit-pretrain` (`run_mcbeit_pretraining.py`), `mcbeit-pretrain-beit` (`run_beit_pretraining.py`) and
`mcbeit-pretrain-beitv2` (`run_beitv2_pretraining.py`).

Every flag of the originals keeps its name and meaning; each entry point has its original's
defaults (:mod:`mcbeit.config.pretrain`). With no flags: a tiny model on the embedded images, on
whatever device is present, in minutes.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from mcbeit.cli.common import config_parser, parse_and_run, run_in_process, to_config
from mcbeit.config.fields import embedded_values
from mcbeit.config.pretrain import BeitPretrainConfig, BeitV2PretrainConfig, PretrainConfig, changed_defaults

#: the embedded demonstration's values of the flags not given (no --data_path)
EMBEDDED_DEFAULTS = embedded_values(PretrainConfig)

EMBEDDED_NOTE = ("Without --data_path the run is the embedded demonstration: the defaults marked 'without "
                 "--data_path' apply to the flags you do not give.")


def get_args_parser() -> argparse.ArgumentParser:
    return config_parser(
        "mcbeit-pretrain", PretrainConfig,
        "mc-BEiT masked image modelling pre-training (--hard_targets: BEiT's loss); the flags of the original "
        "run_mcbeit_pretraining.py. With no flags: a tiny model on the embedded images, on CPU or GPU, in minutes.",
        EMBEDDED_NOTE)


def get_beit_args_parser() -> argparse.ArgumentParser:
    """BEiT's `run_beit_pretraining.py`: hard-token targets, the DALL-E tokenizer, unilm's BEiT defaults."""
    differ = ", ".join(f"--{k} {_fmt(new)} (mc-BEiT: {_fmt(old)})" for k, (old, new) in
                       changed_defaults(BeitPretrainConfig).items())
    return config_parser(
        "mcbeit-pretrain-beit", BeitPretrainConfig,
        "BEiT pre-training (hard visual-token targets; the DALL-E tokenizer when --discrete_vae_weight_path is "
        f"given); the flags of the original run_beit_pretraining.py. Its defaults differ from mc-BEiT's in: {differ}.",
        EMBEDDED_NOTE)


def get_beitv2_args_parser() -> argparse.ArgumentParser:
    """BEiT v2's `run_beitv2_pretraining.py`: VQ-KD targets, patch aggregation, unilm's BEiT v2 defaults."""
    differ = ", ".join(f"--{k} {_fmt(new)} (mc-BEiT: {_fmt(old)})" for k, (old, new) in
                       changed_defaults(BeitV2PretrainConfig).items())
    parser = config_parser(
        "mcbeit-pretrain-beitv2", BeitV2PretrainConfig,
        "BEiT v2 pre-training: hard VQ-KD code ids of --tokenizer_weight as targets; the *_cls_pt models add patch "
        "aggregation (loss = CE(main) + CE(aggregated), 1:1, logged as loss_1 / loss_2); block masks of exactly "
        "--num_mask_patches. The flags of the original run_beitv2_pretraining.py. Its defaults differ from mc-BEiT's "
        f"in: {differ}. Where it differs from the original on purpose: --decoupling_aug True is refused (the "
        "original ignores it); --tokenizer_weight is a file on this machine (nothing is downloaded); without it the "
        "tokenizer is a RANDOM tiny VQ-KD (smoke runs only).",
        EMBEDDED_NOTE)
    return parser


def _fmt(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resolve_defaults(args: argparse.Namespace) -> PretrainConfig:
    """The frozen configuration of a parsed command line (defaults filled, values checked)."""
    return to_config(args, PretrainConfig)


def train(config: PretrainConfig) -> dict:
    """Pre-train as ``config`` says; return the last epoch's log record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.pretrain import PretrainTask

    return Trainer(config, PretrainTask(config)).fit()


def run(args: argparse.Namespace) -> dict:
    """Run a parsed command line in this process: wrong input stops with ``SystemExit(message)``."""
    return run_in_process(train, args, PretrainConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_args_parser(), argv, train)


def main_beit(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_beit_args_parser(), argv, train)


def main_beitv2(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_beitv2_args_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
