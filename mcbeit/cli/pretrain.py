"""`mcbeit-pretrain` (`run_mcbeit_pretraining.py`), `mcbeit-pretrain-beit` (`run_beit_pretraining.py`),
`mcbeit-pretrain-beitv2` (`run_beitv2_pretraining.py`) and `mcbeit-pretrain-conmim` (`run_conmim_pretraining.py`).

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
from mcbeit.config.pretrain import (BeitPretrainConfig, BeitV2PretrainConfig, ConMIMPretrainConfig, PretrainConfig,
                                   changed_defaults)

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


def get_conmim_args_parser() -> argparse.ArgumentParser:
    """ConMIM's `run_conmim_pretraining.py`: denoising patch contrast against an EMA teacher."""
    return config_parser(
        "mcbeit-pretrain-conmim", ConMIMPretrainConfig,
        "ConMIM pre-training (masked image modelling with denoising contrast, TencentARC/ConMIM): the student sees "
        "the crop with masked patches, an EMA teacher (momentum --t_momentum -> 1) the same crop unmasked and "
        "photometrically perturbed; each masked patch's projected feature must pick the teacher's patch at its own "
        "position among the image's patches (InfoNCE at --temp). The flags of the original "
        "run_conmim_pretraining.py with its defaults; the README's recipe adds --mask_type random_mps32 "
        "--mask_ratio 0.75 --imagenet_default_mean_and_std. Writes checkpoint-<epoch>.pth (student, teacher, "
        "optimizer: resumes everything) and checkpoint_copy-<epoch>.pth (the teacher, as the original: the file "
        "to fine-tune). Where it differs from the original on purpose: one process works (the original needs "
        "DDP), any --input_size on the patch grid works, a multiple of 32 with random_mps32 (the original hard-codes "
        "224: 196 patches and a 7x7 random_mps32 grid), the default 'block' masks work on numpy 2 (the original's np.int fails), "
        "--model defaults to conmim_base_patch16_224 (the original's deit_base_patch16_224 has no projector), "
        "the unused second 112 px view is not computed, lm_head (built, never used) is frozen, and --proj_hidden_dim / "
        "--proj_dim make the projector's widths flags. The k-NN monitor (--eval_freq) measures the teacher.",
        EMBEDDED_NOTE)


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


def main_conmim(argv: Sequence[str] | None = None) -> int:
    return parse_and_run(get_conmim_args_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
