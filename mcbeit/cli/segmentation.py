"""`mcbeit-seg train|test|presets`: UperNet semantic segmentation, and the seeds' `tools/train.py` / `tools/test.py`.

    mcbeit-seg train                        # the embedded demonstration: tiny model, generated scenes, minutes on a CPU
    mcbeit-seg train upernet_mcbeit_base_12_512_slide_160k_ade20k_pt --data_path ADE --pretrained CKP
    mcbeit-seg test  CONFIG CHECKPOINT --data_path ADE [--aug-test]
    mcbeit-seg presets                      # the seeds' configs and what each sets

The seeds' command lines run as written from ``semantic_segmentation/`` (``bash tools/dist_train.sh CONFIG GPUS
--work-dir DIR --seed 0 --deterministic --options model.pretrained=CKP``; ``bash tools/dist_test.sh CONFIG CKPT
GPUS --eval mIoU``): the config is a preset of :mod:`mcbeit.config.segmentation`, ``--options`` takes its mmseg keys.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mcbeit.cli.common import config_parser, run_in_process, settings_in_checkpoint, train_test_presets
from mcbeit.config.segmentation import SegmentationConfig, preset_table

EMBEDDED_NOTE = ("Without --data_path (and without a CONFIG) the run is the embedded demonstration: the defaults "
                 "marked 'without --data_path' apply to the flags you do not give. A CONFIG's values apply to the "
                 "flags you do not give; --options KEY=VALUE overrides both.")


class _SegParser(argparse.ArgumentParser):
    """Moves the positional CONFIG (and test's CHECKPOINT) into their flags, and reads test's ``--eval mIoU``."""

    command = "train"

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        args = list(sys.argv[1:] if args is None else args)
        if self.command == "test" and "--eval" in args:  # mmseg's `--eval mIoU [mDice]`: the metrics wanted
            at = args.index("--eval")
            metrics = []
            while at + 1 < len(args) and not args[at + 1].startswith("-"):
                metrics.append(args.pop(at + 1))
            args.pop(at)
            unknown = [m for m in metrics if m != "mIoU"]
            if unknown:
                self.error(f"--eval {' '.join(metrics)}: mcbeit-seg computes mIoU (with mAcc and aAcc); "
                           f"{', '.join(unknown)} is not implemented")
        ns = super().parse_args(args, namespace)
        positional = vars(ns).pop("positional", [])
        if self.command == "test":
            if len(positional) not in (1, 2):
                self.error("test takes [CONFIG] CHECKPOINT (e.g. upernet_mcbeit_base_12_512_slide_160k_ade20k_pt "
                           "work_dir/checkpoint-9.pth; a checkpoint of mcbeit-seg alone carries its settings)")
            if len(positional) == 1:
                for name, value in settings_of(positional[0]).items():
                    vars(ns).setdefault(name, value)
            else:
                ns.config = positional[0]
            ns.load_from, ns.eval = positional[-1], True
            ns.auto_resume = False
            if "output_dir" not in vars(ns):  # evaluation writes nothing unless asked (--show-dir / --work-dir)
                ns.output_dir = ""
        elif positional:
            if len(positional) > 1:
                self.error(f"train takes one CONFIG, got {positional}")
            ns.config = positional[0]
        return ns


def settings_of(checkpoint: str) -> dict:
    """The data, model and evaluation settings a checkpoint of mcbeit-seg was trained with, for ``mcbeit-seg test
    CHECKPOINT``; any other file needs its CONFIG named."""
    import dataclasses

    from mcbeit.config.segmentation import SegData, SegModel

    wanted = {f.name for group in (SegData, SegModel) for f in dataclasses.fields(group)} - {"sync_bn"}
    return settings_in_checkpoint(checkpoint, "mcbeit-seg", "mcbeit-seg-v1", wanted | {"test_mode", "stride"},
                                  "mcbeit-seg test CONFIG CHECKPOINT (e.g. upernet_beit_base_12_640_slide_160k_ade20k_"
                                  "pt2ft for unilm's released BEiT-B 640 file)")


def get_args_parser(command: str = "train") -> argparse.ArgumentParser:
    what = {"train": "Train UperNet on a BEiT backbone (semantic segmentation); with no flags: a tiny model on "
                     "the embedded scenes.",
            "test": "Evaluate a segmentation checkpoint (ours or a released unilm ADE20K file): mIoU, mAcc, aAcc."}
    parser = config_parser(f"mcbeit-seg {command}", SegmentationConfig, what[command], EMBEDDED_NOTE)
    parser.__class__ = _SegParser
    parser.command = command
    parser.add_argument("positional", nargs="*", metavar="CONFIG CHECKPOINT" if command == "test" else "CONFIG",
                        help="a preset (mcbeit-seg presets) or a config file of semantic_segmentation/configs"
                             + ("; then the checkpoint to evaluate" if command == "test" else ""))
    return parser


def train(config: SegmentationConfig) -> dict:
    """Train (or, with --eval / test, evaluate) as ``config`` says; return the last record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.segmentation import SegmentationTask

    trainer = Trainer(config, SegmentationTask(config))
    return trainer.evaluate() if config.eval else trainer.fit()


def run(args: argparse.Namespace) -> dict:
    """Run a parsed command line in this process: wrong input stops with ``SystemExit(message)``."""
    return run_in_process(train, args, SegmentationConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return train_test_presets(argv, "mcbeit-seg", __doc__, preset_table, get_args_parser, train)


def main_train(argv: Sequence[str] | None = None) -> int:
    """The seeds' ``tools/train.py``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


def main_test(argv: Sequence[str] | None = None) -> int:
    """The seeds' ``tools/test.py``."""
    return main(["test", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
