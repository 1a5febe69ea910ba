"""`mcbeit-finetune` (`run_class_finetuning.py`) and `mcbeit-linprobe`.

Every flag of the original keeps its meaning (:mod:`mcbeit.config.finetune`). With no
`--data_path` the run is the embedded demonstration: a tiny BEiT on the embedded images (10
classes, train/ and val/), fine-tuned from the newest checkpoint of `mcbeit-pretrain` in
./output/mcbeit_pretrained when there is one, in a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mcbeit.cli.common import config_parser, parse_and_run, run_in_process, to_config
from mcbeit.config.fields import embedded_values
from mcbeit.config.finetune import PRETRAINED_OUTPUT_DIR, FinetuneConfig, LinprobeConfig  # noqa: F401

EMBEDDED_DEFAULTS = embedded_values(FinetuneConfig)
EMBEDDED_NOTE = ("Without --data_path the run is the embedded demonstration: the defaults marked 'without "
                 "--data_path' apply to the flags you do not give.")


def get_args_parser() -> argparse.ArgumentParser:
    return config_parser(
        "mcbeit-finetune", FinetuneConfig,
        "Fine-tune (or, with --eval, evaluate) a BEiT classifier; the flags of the original run_class_finetuning.py. "
        "With no flags: a tiny model on the embedded images.", EMBEDDED_NOTE)


def get_linprobe_parser() -> argparse.ArgumentParser:
    return config_parser(
        "mcbeit-linprobe", LinprobeConfig,
        "Linear probing of a pre-trained BEiT: frozen backbone, features of --probe_layer, BatchNorm without affine "
        "+ a linear head (MAE / BEiT v2's protocol). The flags of mcbeit-finetune, with linear-probing defaults.",
        EMBEDDED_NOTE)


def resolve_defaults(args: argparse.Namespace) -> FinetuneConfig:
    """The frozen configuration of a parsed command line (defaults filled, values checked)."""
    return to_config(args, FinetuneConfig)


def train(config: FinetuneConfig) -> dict:
    """Fine-tune (or, with --eval, evaluate) as ``config`` says; return the last epoch's record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.finetune import FinetuneTask

    trainer = Trainer(config, FinetuneTask(config))
    try:
        return trainer.evaluate() if config.eval else trainer.fit()
    finally:
        if config.enable_deepspeed and "mcbeit.engine.deepspeed" in sys.modules:
            sys.modules["mcbeit.engine.deepspeed"].release_process_group()


def run(args: argparse.Namespace) -> dict:
    """Run a parsed command line in this process: wrong input stops with ``SystemExit(message)``."""
    return run_in_process(train, args, FinetuneConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_args_parser(), argv, train)


def main_linprobe(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_linprobe_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
