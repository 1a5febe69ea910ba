"""`mcbeit-det train|test|presets`: Mask R-CNN detection and instance segmentation on a BEiT backbone, and the
seed's `lazyconfig_train_net.py`.

    mcbeit-det train                        # the embedded demonstration: tiny model, generated scenes, minutes on a CPU
    mcbeit-det train benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit --data_path COCO --pretrained CKP
    mcbeit-det test  CHECKPOINT [CONFIG] --data_path COCO
    mcbeit-det presets                      # the seed's configs and what each sets

Trailing ``KEY=VALUE`` arguments are detectron2's LazyConfig overrides (``train.init_checkpoint=CKP``,
``optimizer.lr=1e-4``; see :data:`mcbeit.config.detection.OPTION_KEYS`). The seed's command line runs as written from
``mimdet/`` (``python lazyconfig_train_net.py --config-file configs/benchmarking/NAME.py --num-gpus 8 --num-machines 4
--machine-rank R --dist-url tcp://HOST:PORT [--resume] [--eval-only] [KEY=VALUE ...]``): :func:`main_lazyconfig`
starts the processes through torch's own launcher (:mod:`mcbeit.launch`, torchrun).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mcbeit.cli.common import config_parser, run_in_process, settings_in_checkpoint, train_test_presets
from mcbeit.config.detection import DetectionConfig, preset_table

EMBEDDED_NOTE = ("Without --data_path (and without a CONFIG) the run is the embedded demonstration: the defaults "
                 "marked 'without --data_path' apply to the flags you do not give. A CONFIG's values apply to the "
                 "flags you do not give; trailing KEY=VALUE overrides (detectron2's) override both. "
                 "Differences from the original (MIMDet's benchmarking Mask R-CNN on detectron2) on purpose: "
                 "torchvision's Mask R-CNN with detectron2's aligned RoIAlign, unrounded anchors and L1 box losses; "
                 "the heads' BatchNorm is torch's (the original: detectron2's NaiveSyncBatchNorm); predictors keep "
                 "torchvision's unused background output; bf16 autocast on a GPU by default (--amp fp16: the "
                 "original's); the run auto-resumes from --output_dir with or without --resume.")


class _DetParser(argparse.ArgumentParser):
    """Moves the positional CONFIG (test: CHECKPOINT [CONFIG]) into their flags and KEY=VALUE into the overrides."""

    command = "train"

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        from mcbeit.config.detection import OPTION_KEYS

        args = list(sys.argv[1:] if args is None else args)
        # detectron2's trailing KEY=VALUE may come anywhere (argparse would not take positionals after the flags)
        overrides = [a for a in args if "=" in a and not a.startswith("-") and a.split("=", 1)[0] in OPTION_KEYS]
        ns = super().parse_args([a for a in args if a not in overrides], namespace)
        positional = vars(ns).pop("positional", [])
        overrides += [p for p in positional if "=" in p]
        positional = [p for p in positional if "=" not in p]
        if overrides:
            ns.overrides = tuple(getattr(ns, "overrides", ())) + tuple(overrides)
        if self.command == "test":
            if len(positional) not in (1, 2):
                self.error("test takes CHECKPOINT [CONFIG] (a checkpoint of mcbeit-det carries its settings)")
            if len(positional) == 2:
                ns.config = positional[1]
            else:
                for name, value in settings_of(positional[0]).items():
                    vars(ns).setdefault(name, value)
            ns.init_checkpoint, ns.eval_only, ns.auto_resume = positional[0], True, False
            if "output_dir" not in vars(ns):  # evaluation writes nothing unless asked
                ns.output_dir = ""
        elif positional:
            if len(positional) > 1:
                self.error(f"train takes one CONFIG, got {positional}")
            ns.config = positional[0]
        return ns


def settings_of(checkpoint: str) -> dict:
    """The data and model settings a checkpoint of mcbeit-det was trained with, for ``mcbeit-det test CHECKPOINT``;
    any other file needs its CONFIG named."""
    import dataclasses

    from mcbeit.config.detection import DetData, DetModel
    from mcbeit.tasks.detection import CHECKPOINT_FORMAT

    wanted = {f.name for group in (DetData, DetModel) for f in dataclasses.fields(group)} - {
        "sync_bn", "grad_checkpointing", "data_path", "train_json", "train_images", "val_json", "val_images"}
    return settings_in_checkpoint(checkpoint, "mcbeit-det", CHECKPOINT_FORMAT, wanted,
                                  "mcbeit-det test CHECKPOINT CONFIG")


def get_args_parser(command: str = "train") -> argparse.ArgumentParser:
    what = {"train": "Train Mask R-CNN on a BEiT backbone (COCO detection and instance segmentation); with no flags: "
                     "a tiny model on the embedded scenes.",
            "test": "Evaluate a detection checkpoint: COCO box and mask AP."}
    parser = config_parser(f"mcbeit-det {command}", DetectionConfig, what[command], EMBEDDED_NOTE)
    parser.__class__ = _DetParser
    parser.command = command
    parser.add_argument("positional", nargs="*", metavar="CHECKPOINT [CONFIG]" if command == "test" else "CONFIG",
                        help=("a preset (mcbeit-det presets) or a config file of mimdet/configs" if command == "train"
                              else "the checkpoint to evaluate, then its preset or config file")
                        + "; KEY=VALUE arguments are detectron2-style overrides")
    return parser


def train(config: DetectionConfig) -> dict:
    """Train (or, with --eval_only / test, evaluate) as ``config`` says; return the last record."""
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.detection import DetectionTask

    trainer = Trainer(config, DetectionTask(config))
    return trainer.evaluate() if config.eval_only else trainer.fit()


def run(args: argparse.Namespace) -> dict:
    """Run a parsed command line in this process: wrong input stops with ``SystemExit(message)``."""
    return run_in_process(train, args, DetectionConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return train_test_presets(argv, "mcbeit-det", __doc__, preset_table, get_args_parser, train)


# ---------------------------------------------------------------------- the seed's lazyconfig_train_net.py
def lazyconfig_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser()``: the launcher's arguments; everything else goes to mcbeit-det."""
    parser = argparse.ArgumentParser(
        "lazyconfig_train_net.py", description="The seed's detectron2 entry point, run by mcbeit-det: the config is a "
        "preset of mcbeit.config.detection, KEY=VALUE its LazyConfig overrides; other flags are mcbeit-det train's.")
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file (or a preset name)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint of the output "
                        "folder (mcbeit-det always does when one is there)")
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (CPU processes without GPUs)")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    parser.add_argument("--dist-url", default="auto", help="initialization URL for pytorch distributed backend "
                        "(tcp://HOST:PORT; auto: a free port on this machine)")
    return parser


def launcher_command(args: argparse.Namespace, rest: Sequence[str], script: str) -> list[str] | None:
    """The torchrun command that starts ``--num-gpus`` x ``--num-machines`` processes of ``script`` with ``rest``,
    or None for one process (or when already inside a launched process)."""
    world = args.num_gpus * args.num_machines
    # inside a process a launcher started (torchrun sets TORCHELASTIC_RUN_ID; LOCAL_RANK alone is no proof: DeepSpeed
    # setups write it into the environment of one-process runs too)
    if world <= 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    cmd = [sys.executable, "-m", "mcbeit.launch", f"--nproc_per_node={args.num_gpus}",
           f"--nnodes={args.num_machines}", f"--node_rank={args.machine_rank}"]
    if args.dist_url == "auto":
        if args.num_machines > 1:
            raise SystemExit("lazyconfig_train_net.py: --dist-url auto works on one machine only; give "
                             "tcp://HOST:PORT of machine 0")
        cmd.append("--standalone")
    else:
        from urllib.parse import urlparse

        url = urlparse(args.dist_url)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise SystemExit(f"lazyconfig_train_net.py: --dist-url {args.dist_url}: expected tcp://HOST:PORT")
        cmd += [f"--master_addr={url.hostname}", f"--master_port={url.port}"]
    return [*cmd, script, *rest]


def main_lazyconfig(argv: Sequence[str] | None = None, script: str | None = None) -> int:
    """``python lazyconfig_train_net.py --config-file CFG --num-gpus G --num-machines M --machine-rank R --dist-url URL
    [--resume] [--eval-only] [KEY=VALUE ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = lazyconfig_parser().parse_known_args(argv)
    forwarded = ([*(["--config-file", args.config_file] if args.config_file else []),
                  *(["--resume"] if args.resume else []), *(["--eval-only"] if args.eval_only else []), *rest])
    command = launcher_command(args, forwarded, script or sys.argv[0])
    if command is not None:  # this process becomes the launcher: its signals (Ctrl-C, SIGTERM) reach torchrun's
        print("lazyconfig_train_net.py: starting", args.num_gpus * args.num_machines, "processes:", " ".join(command),
              file=sys.stderr, flush=True)
        os.execv(command[0], command)
    own = list(rest)
    if args.config_file:
        own = ["--config", args.config_file, *own]
    if args.eval_only:
        own.append("--eval_only")
    return main(["train", *own])


if __name__ == "__main__":
    sys.exit(main())
