"""`mcbeit-knn`: representation quality of any checkpoint, as weighted k-NN (and a quick linear probe)
on its frozen features (issue 15).

    mcbeit-knn --resume output/pretrain/checkpoint-99.pth --data_path /data/imagenet --eval_linear
    mcbeit-knn --model beit_base_patch16_224 --data_path /data/imagenet      # random init: the baseline

The model is read as :mod:`mcbeit.models.export` reads it (this project's pre-training and fine-tuning
checkpoints, released BEiT / mc-BEiT files: pass ``--model`` for a file without ``args``); ``--model``
alone builds a randomly initialised timm model. Features, k-NN and linear probe:
:mod:`mcbeit.evaluation.knn` (DINO's protocol: cosine similarity, k 20, temperature 0.07). Runs on one
process or under ``torchrun`` (each rank extracts its shard; the features are gathered).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from mcbeit.errors import InputError

log = logging.getLogger("mcbeit.knn")
PROG = "mcbeit-knn"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        PROG,
        description="Weighted k-NN (DINO protocol) and optionally a linear probe on the frozen features of a BEiT "
                    "checkpoint (mcbeit-pretrain, mcbeit-finetune, a released BEiT/mc-BEiT .pth) or of a randomly "
                    "initialised timm model (--model without --resume), on a labelled train and val split.")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="the checkpoint to measure; without it, --model is built with random weights")
    p.add_argument("--model", default=None,
                   help="timm name, e.g. beit_base_patch16_224 (a pre-training name ending in _8k_vocab is taken as "
                        "its classifier with --resume); default: the checkpoint's args.model")
    p.add_argument("--use_ema", action="store_true", help="measure the checkpoint's model_ema weights")
    p.add_argument("--data_path", default=None,
                   help="labelled train split: a folder of class folders, or a root with train/ (class folders) or "
                        "train_map.txt; default: the embedded dataset's train and val splits")
    p.add_argument("--eval_data_path", default=None,
                   help="labelled val split (class folders, or a root with val/ or val_map.txt); default: "
                        "<data_path>/val or val_map.txt, else the sibling <data_path>/../val")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size; default: the checkpoint's grid, else 224")
    p.add_argument("--imagenet_default_mean_and_std", action="store_true", default=None,
                   help="normalise with ImageNet's mean/std (default: the checkpoint's flag; 0.5/0.5 without it)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--nb_knn", type=int, nargs="+", default=[20], help="k values, e.g. --nb_knn 10 20 100 200")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--block", type=int, default=None,
                   help="also measure the features of this block (0-based, before any norm)")
    p.add_argument("--eval_linear", action="store_true", help="also fit a quick linear probe on the features")
    p.add_argument("--seed", type=int, default=0, help="random init of --model alone, and the linear probe")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"),
                   help="autocast of the feature extraction (default: bf16 on CUDA, off on CPU; a CPU that only "
                        "emulates bf16 / fp16 extracts in fp32)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the results as JSON")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.resume is None and args.model is None:
        raise InputError("pass --resume CKPT (a checkpoint) or --model NAME (random initialisation)")
    if args.eval_data_path is not None and args.data_path is None:
        raise InputError("--eval_data_path needs --data_path (the train split)")
    if any(k < 1 for k in args.nb_knn):
        raise InputError(f"--nb_knn {' '.join(map(str, args.nb_knn))}: every k must be at least 1")
    if args.temperature <= 0:
        raise InputError(f"--temperature {args.temperature}: must be positive")
    if args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.output is not None and Path(args.output).is_dir():
        raise InputError(f"--output {args.output} is a folder: pass the path of a .json file")


def load_model(args: argparse.Namespace):
    """(model in eval mode, description, input size, mean, std, crop_pct) for ``args``."""
    import timm
    import torch

    import mcbeit.models  # noqa: F401  (registers the project's names with timm)
    from mcbeit.data.transforms import normalisation

    if args.resume is not None:
        from mcbeit.models.export import ExportError, load_for_export

        overrides = {k: getattr(args, k) for k in ("model", "input_size", "imagenet_default_mean_and_std")}
        try:
            exp = load_for_export(args.resume, use_ema=args.use_ema, overrides=overrides)
        except ExportError as e:
            raise InputError(_one_line(str(e), args.resume)) from None
        cfg = exp.data_config
        return (exp.model.eval(), f"{exp.source} {exp.name} from {args.resume}", int(cfg["input_size"][-1]),
                tuple(cfg["mean"]), tuple(cfg["std"]), float(cfg["crop_pct"]))
    size = args.input_size or 224
    if not timm.is_model(args.model):
        raise InputError(f"--model {args.model}: not a model timm knows (e.g. beit_base_patch16_224)")
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=size)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise InputError(f"--model {args.model}: not a ViT with forward_intermediates (a BEiT or timm ViT)")
    mean, std = normalisation(bool(args.imagenet_default_mean_and_std))
    return model.eval(), f"random init {args.model} (seed {args.seed})", size, tuple(mean), tuple(std), None


def _one_line(message: str, path: str) -> str:
    """The conversion's error in one line: its first line, and what the weights lack in a word."""
    lines = message.splitlines()
    if "missing (in the model, not in the checkpoint): patch_embed.proj.weight" in message:
        return (f"{path} holds no BEiT weights (no patch_embed, blocks, ... keys): pass a pre-training or fine-tuning "
                "checkpoint, or a released BEiT .pth")
    summary = next((ln for ln in lines[1:] if "does not fit the model" in ln), "")
    return lines[0] + (f" ({summary.split(': ', 1)[-1]})" if summary else "")


def build_splits(args: argparse.Namespace, transform):
    """(train dataset, val dataset) of the data flags (see ``--data_path`` / ``--eval_data_path``)."""
    from mcbeit.data.labelled import labelled_splits

    return labelled_splits(args.data_path, args.eval_data_path, transform)


def measure(train_feats, train_labels, val_feats, val_labels, num_classes: int, args: argparse.Namespace) -> dict:
    """{'knn': {feature: {k: {top1, top5}}}, 'linear': {feature: {top1, top5}}} (linear with --eval_linear)."""
    from mcbeit.evaluation.knn import knn_accuracy, linear_probe_accuracy

    out: dict = {"knn": {}}
    for key in train_feats:
        out["knn"][key] = {str(k): knn_accuracy(train_feats[key], train_labels, val_feats[key], val_labels,
                                                num_classes, k=k, temperature=args.temperature)
                           for k in args.nb_knn}
    if args.eval_linear:
        out["linear"] = {key: linear_probe_accuracy(train_feats[key], train_labels, val_feats[key], val_labels,
                                                    num_classes, seed=args.seed) for key in train_feats}
    return out


def format_table(results: dict) -> str:
    rows = [("feature", "method", "top-1", "top-5")]
    for key, by_k in results["knn"].items():
        for k, acc in by_k.items():
            rows.append((key, f"k-NN k={k}", f"{acc['top1']:.2f}", f"{acc['top5']:.2f}"))
    for key, acc in results.get("linear", {}).items():
        rows.append((key, "linear", f"{acc['top1']:.2f}", f"{acc['top5']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def write_json_atomically(path: str | os.PathLike, data: dict) -> Path:
    """``data`` as indented JSON through the checkpoints' atomic write (temporary file, fsync, rename,
    the user's umask): the old file or the new one, never half of one."""
    from mcbeit.engine.checkpoint import write_atomic

    text = (json.dumps(data, indent=2) + "\n").encode()
    return write_atomic(path, lambda f: f.write(text))


def run(args: argparse.Namespace) -> dict:
    """Measure as ``args`` say; print the table on rank 0 and return the results (every rank)."""
    from mcbeit.data.classification_transforms import build_classification_transform
    from mcbeit.data.samplers import build_eval_loader
    from mcbeit.engine.distributed import init_distributed
    from mcbeit.engine.precision import resolve_precision
    from mcbeit.evaluation.knn import extract

    _check_args(args)
    info = init_distributed(args.device)
    model, what, size, mean, std, crop_pct = load_model(args)
    depth = len(model.blocks)
    if args.block is not None and not 0 <= args.block < depth:
        raise InputError(f"--block {args.block}: {what} has blocks 0..{depth - 1}")
    model.to(info.device)
    amp_dtype = resolve_precision(args.amp, info.device, scaler=False).target_dtype
    transform = build_classification_transform(False, size, mean=mean, std=std, crop_pct=crop_pct)
    train, val = build_splits(args, transform)
    num_classes = max(int(train.num_classes), int(val.num_classes))
    feats = []
    for dataset in (train, val):
        loader = build_eval_loader(dataset, args.batch_size, args.num_workers, pin_memory=info.device.type == "cuda",
                                   world_size=info.world_size, rank=info.rank)
        feats.append(extract(model, loader, info.device, block=args.block, amp_dtype=amp_dtype, sharded=True))
    (train_feats, train_labels), (val_feats, val_labels) = feats
    results = measure(train_feats, train_labels, val_feats, val_labels, num_classes, args)
    report = {"model": what, "resume": args.resume, "input_size": size, "amp": str(amp_dtype or "off"),
              "num_train": len(train),
              "num_val": len(val), "num_classes": num_classes, "temperature": args.temperature,
              "nb_knn": list(args.nb_knn), "block": args.block, **results}
    if info.is_main:
        print(f"{what}, {size} px: {len(train)} train / {len(val)} val images, {num_classes} classes "
              f"(k-NN temperature {args.temperature}; accuracies in %)")
        print(format_table(results))
        if args.output is not None:
            print(f"wrote {write_json_atomically(args.output, report)}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)  # before torch is imported: --help is instant
    from mcbeit.engine.logging import setup_logging

    setup_logging()
    try:
        run(args)
    except InputError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    finally:
        if "torch" in sys.modules:
            from mcbeit.engine.distributed import cleanup

            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
