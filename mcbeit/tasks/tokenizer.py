"""`mcbeit-tokenizer`: train a discrete tokenizer of one's own (`train`) and look at any tokenizer (`inspect`).

`train` fits a VQ-VAE (:mod:`mcbeit.tokenizers.training`; the `vq` head of the `customized` tokenizer: the small DALL-E-style
encoder, l2-normalised codes updated by EMA, a straight-through estimator, an f8 conv decoder)
on any dataset the pre-training accepts, the embedded images by default. Its checkpoints
(`checkpoint-<epoch>.pth`, which carry the tokenizer file under their `'tokenizer'` key) and the
`tokenizer.pth` written beside them at every save are both usable as
`--discrete_vae_type customized --discrete_vae_weight_path ...` in pre-training.

`inspect` draws, for a few images, the image, its token-id map in false colour and (when the
tokenizer has a decoder) the reconstruction from the ids, as one PNG grid; and the
codebook-usage histogram over N images as a second PNG, with the usage figures in the log.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.samplers import build_train_loader
from mcbeit.data.transforms import OneViewTransform
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, resolve_device, wrap_ddp
from mcbeit.engine.logging import RunWriter, setup_logging
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.schedules import cosine_scheduler
from mcbeit.tasks.common import (add_runtime_arguments, amp_settings, check_at_least, fill_defaults, epoch_save_due,
                                 load_resumed_weights, log_plan, position_state, resume_path, resume_position,
                                 run_parsed, save_checkpoint, seed_everything, start_run, warmup_steps)
from mcbeit.tokenizers import TOKENIZER_KINDS, build_tokenizer
from mcbeit.tokenizers.custom import (TOKENIZER_EXPORT_NAME, VQ_DEFAULT_EMBED_DIM, VQ_DEFAULT_LOGIT_SCALE,
                                      CustomTokenizer, custom_tokenizer_payload)
from mcbeit.tokenizers.training import VQVAETraining, check_codebook_replicas, train_one_epoch, usage_figures
from mcbeit.tokenizers.visualize import draw_token_grid, draw_usage_histogram

log = logging.getLogger("mcbeit.tokenizer")

CHECKPOINT_FORMAT = "mcbeit-tokenizer-v1"
DEFAULT_OUTPUT_DIR = "./output/mcbeit_tokenizer"
DEFAULT_INSPECT_OUTPUT = "./output/tokenizer_inspect.png"

# The no-flag run on the embedded images (1,000 images at 112 px) finishes in a few minutes on a
# 2-core CPU; with --data_path the defaults are those of a real run.
EMBEDDED_DEFAULTS = {"vocab_size": 1024, "epochs": 5, "batch_size": 32, "warmup_epochs": 1, "save_ckpt_freq": 2}
DATASET_DEFAULTS = {"vocab_size": 8192, "epochs": 100, "batch_size": 64, "warmup_epochs": 5, "save_ckpt_freq": 10}

# ============================================================================ command line: train
def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    emb = " ({} on the embedded data when --data_path is not given)"
    p.add_argument("--data_path", default=None, type=str,
                   help="dataset folder (ImageFolder tree, or train/ + train_map.txt); default: the embedded images")
    p.add_argument("--data_set", default=None, choices=["CIFAR", "IMNET", "image_folder"],
                   help="dataset layout; default: detected from the folder (and said in the log)")
    p.add_argument("--input_size", default=112, type=int, help="training crop size (a multiple of 8: tokens = size / 8)")
    p.add_argument("--vocab_size", default=None, type=int,
                   help="codebook size; default 8192" + emb.format(EMBEDDED_DEFAULTS["vocab_size"]))
    p.add_argument("--embed_dim", default=VQ_DEFAULT_EMBED_DIM, type=int, help="dimension of the (l2-normalised) codes")
    p.add_argument("--hidden", default=16, type=int, help="width n_hid of the encoder and decoder (DALL-E: 256)")
    p.add_argument("--blocks_per_group", default=1, type=int, help="residual blocks per resolution (DALL-E: 2)")
    p.add_argument("--logit_scale", default=VQ_DEFAULT_LOGIT_SCALE, type=float,
                   help="pre-training logits are -logit_scale * squared distance to each code")
    p.add_argument("--commitment", default=0.25, type=float, help="weight of the commitment loss")
    p.add_argument("--ema_decay", default=0.99, type=float, help="EMA decay of the codebook")
    p.add_argument("--dead_code_steps", default=20, type=int,
                   help="re-initialise a code unused for this many steps from random batch features (0: never)")
    p.add_argument("--crop_min_scale", default=0.35, type=float, help="random-resized-crop scale range (min, 1)")
    p.add_argument("--interpolation", default="lanczos", type=str,
                   help="resize filter (pre-training's --second_interpolation is lanczos)")
    p.add_argument("--batch_size", default=None, type=int,
                   help="per-process batch size; default 64" + emb.format(EMBEDDED_DEFAULTS["batch_size"]))
    p.add_argument("--epochs", default=None, type=int, help="default 100" + emb.format(EMBEDDED_DEFAULTS["epochs"]))
    p.add_argument("--lr", default=2e-3, type=float)
    p.add_argument("--min_lr", default=1e-5, type=float)
    p.add_argument("--warmup_epochs", default=None, type=int,
                   help="LR warm-up epochs; default 5" + emb.format(EMBEDDED_DEFAULTS["warmup_epochs"]))
    p.add_argument("--warmup_steps", default=-1, type=int, help="LR warm-up in steps; overrides --warmup_epochs if > 0")
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--opt_betas", default=[0.9, 0.99], type=float, nargs=2)
    p.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (default: no clipping)")
    p.add_argument("--save_ckpt_freq", default=None, type=int,
                   help="save every N epochs (and at the end); default 10" + emb.format(EMBEDDED_DEFAULTS["save_ckpt_freq"]))
    p.add_argument("--image_freq", default=0, type=int,
                   help="also write an input/reconstruction grid to TensorBoard every N steps (0: at epoch ends only)")
    add_runtime_arguments(p, output_dir=DEFAULT_OUTPUT_DIR, print_freq=10)  # output, resume, device, amp, launcher
    return p


def get_train_parser() -> argparse.ArgumentParser:
    return add_train_arguments(argparse.ArgumentParser(
        "mcbeit-tokenizer train", description=_TRAIN_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter))


_TRAIN_DESCRIPTION = (
    "Train a VQ-VAE tokenizer (f8: 14x14 tokens for a 112 px input) usable in pre-training as "
    "--discrete_vae_type customized --discrete_vae_weight_path <output_dir>/checkpoint-<epoch>.pth (or "
    "<output_dir>/tokenizer.pth). With no flags: 1024 codes on the embedded images, a few minutes on a CPU.")


def resolve_train_defaults(args: argparse.Namespace) -> argparse.Namespace:
    fill_defaults(args, EMBEDDED_DEFAULTS, DATASET_DEFAULTS)
    if args.log_dir is None and args.output_dir:
        args.log_dir = os.path.join(args.output_dir, "tensorboard")
    check_at_least(args, 1, ("batch_size", "epochs", "save_ckpt_freq", "embed_dim", "hidden", "blocks_per_group",
                             "print_freq"))
    check_at_least(args, 2, ("vocab_size",))
    if args.input_size % 8 or args.input_size < 8:
        raise SystemExit(f"--input_size {args.input_size}: the tokenizer downsamples by 8, use a multiple of 8 "
                         f"(e.g. {max(8, args.input_size // 8 * 8)})")
    if not 0.0 < args.crop_min_scale <= 1.0:
        raise SystemExit(f"--crop_min_scale must lie in (0, 1], got {args.crop_min_scale}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise SystemExit(f"--ema_decay must lie in [0, 1), got {args.ema_decay}")
    return args


def build_vq_tokenizer(args: argparse.Namespace) -> CustomTokenizer:
    return CustomTokenizer(image_size=args.input_size, head="vq", vocab_size=args.vocab_size, n_hid=args.hidden,
                           n_blk_per_group=args.blocks_per_group, embed_dim=args.embed_dim, logit_scale=args.logit_scale)


def build_train_data(args: argparse.Namespace, tokenizer: CustomTokenizer, info: DistInfo):
    transform = OneViewTransform(args.input_size, scale=(args.crop_min_scale, 1.0), interpolation=args.interpolation,
                                 output_transform=tokenizer.input_transform)
    dataset = build_pretraining_dataset(args.data_path, args.data_set, transform, args.seed)
    loader, sampler, steps = build_train_loader(dataset, args.batch_size, args.num_workers,
                                                args.pin_mem and info.device.type == "cuda", args.seed,
                                                info.world_size, info.rank)
    log.info("data: %d images, %s", len(dataset), transform)
    return loader, sampler, steps


def restore(args: argparse.Namespace, vq: VQVAETraining, optimizer, scaler, steps_per_epoch: int,
            info: DistInfo) -> tuple[int, int, str | None]:
    """Load --resume (or the newest whole checkpoint with --auto_resume); return (start_epoch, steps
    already done in it, path), with this rank's random generators restored."""
    path = resume_path(args)
    if path is None:
        return args.start_epoch, 0, None
    ckpt = ckpt_io.load_training_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        if args.resume:
            source, fix = f"--resume {path}", "pass a checkpoint-<epoch>.pth of mcbeit-tokenizer train"
        else:
            source, fix = f"auto-resume from {path}", "start afresh with another --output_dir (or --no_auto_resume)"
        raise SystemExit(f"{source} is not a checkpoint of mcbeit-tokenizer train "
                         f"(format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); {fix}")
    load_resumed_weights(vq, ckpt["model"], path, args, ckpt.get("args"))
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    start, first = resume_position(ckpt, path, steps_per_epoch, info, args.start_epoch)
    return start, first, path


def save(args: argparse.Namespace, info: DistInfo, epoch: int, steps_done: int, steps_per_epoch: int,
         vq: VQVAETraining, optimizer, scaler) -> str | None:
    """`checkpoint-<epoch>.pth` (training state, position, the tokenizer file under 'tokenizer') and
    `tokenizer.pth`. Every rank calls it (random states are gathered); rank 0 writes and returns the path."""
    position = position_state(info, epoch, steps_done, steps_per_epoch)
    if not info.is_main:
        return None
    payload = custom_tokenizer_payload(vq.tokenizer)
    state = {"format": CHECKPOINT_FORMAT, "model": vq.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, **position,
             "args": ckpt_io.plain_args(args), "tokenizer": payload}
    path = save_checkpoint(args, epoch, state)
    ckpt_io.save_atomic(payload, Path(args.output_dir) / TOKENIZER_EXPORT_NAME)
    return os.path.abspath(path)


def run_train(args: argparse.Namespace) -> dict:
    """Train a VQ-VAE tokenizer as `args` say; return the last epoch's statistics."""
    info = start_run(args, resolve_train_defaults, "training the tokenizer")

    seed_everything(args.seed)  # the same initial weights and codebook on every rank
    tokenizer = build_vq_tokenizer(args)
    vq = VQVAETraining(tokenizer, commitment=args.commitment, decay=args.ema_decay).to(info.device)
    n_parameters = sum(p.numel() for p in vq.parameters() if p.requires_grad)
    log.info("VQ-VAE tokenizer: %d codes x %d dims, n_hid %d, f%d (%dx%d tokens at %d px), %.2fM parameters",
             args.vocab_size, args.embed_dim, args.hidden, tokenizer.downsample, *tokenizer.token_grid(),
             args.input_size, n_parameters / 1e6)
    seed_everything(args.seed + info.rank)

    loader, sampler, steps_per_epoch = build_train_data(args, tokenizer, info)
    amp_dtype, scaler = amp_settings(args.amp, info.device)
    optimizer = build_optimizer(vq, "adamw", lr=args.lr, weight_decay=args.weight_decay, opt_betas=tuple(args.opt_betas))
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, warmup_epochs=args.warmup_epochs,
                                   warmup_steps=warmup_steps(args, steps_per_epoch))
    start_epoch, first, resumed_from = restore(args, vq, optimizer, scaler, steps_per_epoch, info)
    ddp_model = wrap_ddp(vq, info)
    writer = RunWriter(args.output_dir, args.log_dir, enabled=info.is_main and bool(args.output_dir))
    log_plan(args, info, steps_per_epoch, amp_dtype, start_epoch, resumed_from)

    stats: dict = {}
    last_ckpt = resumed_from
    started = time.perf_counter()
    resume_point = lambda e, done: save(args, info, e, done, steps_per_epoch, vq, optimizer, scaler)  # noqa: E731
    control = RunControl.from_args(args, info, resume_point if args.output_dir else None, steps_per_epoch)
    try:
        control.install()
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=first * args.batch_size)
            stats = train_one_epoch(ddp_model, vq, optimizer, scaler, lr_schedule, loader, epoch, steps_per_epoch,
                                    info, amp_dtype, writer, last_ckpt, clip_grad=args.clip_grad,
                                    dead_code_steps=args.dead_code_steps, print_freq=args.print_freq,
                                    image_freq=args.image_freq, max_bad_steps=args.max_bad_steps,
                                    max_bad_fraction=args.max_bad_fraction, first=first, control=control)
            first = 0
            last_ckpt = control.last_checkpoint or last_ckpt
            check_codebook_replicas(vq)
            if epoch_save_due(args, epoch):
                last_ckpt = save(args, info, epoch, steps_per_epoch, steps_per_epoch, vq, optimizer, scaler) or last_ckpt
                if info.is_main:
                    log.info("saved %s (and %s)", last_ckpt, TOKENIZER_EXPORT_NAME)
            stats = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "vocab_size": args.vocab_size,
                     "n_parameters": n_parameters}
            writer.epoch(stats)
            log.info("epoch %d: rec_loss %.4f (PSNR %.1f dB), commit %.4f, codes used %d/%d, perplexity %.1f "
                     "(batch mean %.1f), %d dead codes re-initialised, lr %.2e", epoch, stats["train_rec_loss"],
                     stats["train_psnr"], stats["train_commit_loss"], stats["train_epoch_codes_used"], args.vocab_size,
                     stats["train_epoch_perplexity"], stats["train_perplexity"], stats["train_dead_codes_reinit"],
                     stats["train_lr"])
    finally:
        control.uninstall()
        writer.close()
    if stats and args.output_dir:
        log.info("done in %.1f s; use it with --discrete_vae_type customized --discrete_vae_weight_path %s",
                 time.perf_counter() - started, last_ckpt)
    return stats


# ============================================================================ command line: inspect
def add_inspect_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--discrete_vae_type", default="customized", type=str, help=f"one of {', '.join(TOKENIZER_KINDS)}")
    p.add_argument("--discrete_vae_weight_path", default=None, type=str,
                   help="tokenizer weights (as in pre-training); absent = RANDOM weights")
    p.add_argument("--data_path", default=None, type=str, help="dataset folder; default: the embedded images")
    p.add_argument("--data_set", default=None, choices=["CIFAR", "IMNET", "image_folder"])
    p.add_argument("--input_size", default=112, type=int, help="image size given to the tokenizer (centre crop)")
    p.add_argument("--num_images", default=8, type=int, help="images (columns) in the grid")
    p.add_argument("--output", default=DEFAULT_INSPECT_OUTPUT,
                   help="PNG of the grid; the histogram goes beside it as <name>_histogram.png")
    p.add_argument("--histogram_images", default=512, type=int, help="images whose tokens the usage histogram counts")
    p.add_argument("--batch_size", default=32, type=int)
    p.add_argument("--num_workers", default=0, type=int)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--seed", default=0, type=int, help="which images the histogram draws")
    return p


def get_inspect_parser() -> argparse.ArgumentParser:
    return add_inspect_arguments(argparse.ArgumentParser(
        "mcbeit-tokenizer inspect", description=_INSPECT_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter))


_INSPECT_DESCRIPTION = ("Look at a tokenizer: image / token-id map / reconstruction grid for a few images, and the "
                        "codebook-usage histogram over a dataset (two PNGs; usage figures in the log).")


def histogram_path(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.with_name(out.stem + "_histogram.png")


@torch.no_grad()
def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Write the token grid and the usage histogram; return the usage figures and the paths."""
    setup_logging(0)
    if args.num_images < 1 or args.histogram_images < 0 or args.batch_size < 1:
        raise SystemExit("--num_images and --batch_size must be at least 1, --histogram_images at least 0")
    device = resolve_device(args.device)
    tokenizer = build_tokenizer(args.discrete_vae_type, args.discrete_vae_weight_path, args.input_size).to(device)
    transform = OneViewTransform(args.input_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)  # centre crop, [0,1]
    dataset = build_pretraining_dataset(args.data_path, args.data_set, transform, args.seed)
    name = f"{tokenizer.kind} ({'random weights' if tokenizer.random_weights else args.discrete_vae_weight_path})"

    def tokens_of(images: torch.Tensor) -> torch.Tensor:
        x = tokenizer.input_transform(images.to(device))
        return tokenizer(x).argmax(dim=1)                                # (B, h, w)

    n = min(args.num_images, len(dataset))
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)      # spread over the (class-sorted) dataset
    images = torch.stack([dataset[int(i)][0] for i in picks])
    ids = tokens_of(images)
    recon = None
    if tokenizer.has_decoder:
        recon = tokenizer.decode(ids)
    else:
        log.info("%s has no decoder: the grid shows images and token maps only (no reconstructions)", name)
    grid = draw_token_grid(images, ids, recon, tokenizer.vocab_size,
                           title=f"{name}: {tokenizer.vocab_size} codes, {ids.shape[1]}x{ids.shape[2]} tokens")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    result: dict[str, Any] = {"grid": str(out), "vocab_size": tokenizer.vocab_size, "has_decoder": tokenizer.has_decoder}
    if recon is not None:
        result["grid_rec_mse"] = float(F.mse_loss(recon.cpu(), images).item())  # in [0, 1] pixel space

    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    m = min(args.histogram_images, len(dataset))
    order = np.random.default_rng(args.seed).permutation(len(dataset))[:m]
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=args.batch_size, num_workers=max(0, args.num_workers))
    for batch in loader:
        counts += torch.bincount(tokens_of(batch[0]).flatten().cpu(), minlength=tokenizer.vocab_size).double()
    usage = usage_figures(counts)
    title = (f"{name}: {usage['codes_used']}/{tokenizer.vocab_size} codes used ({100 * usage['code_usage']:.1f}%), "
             f"perplexity {usage['perplexity']:.1f}, {usage['tokens']} tokens from {m} images")
    hist = histogram_path(out)
    draw_usage_histogram(counts.numpy(), title).save(hist)
    log.info("codebook usage over %d images (%d tokens): %d of %d codes used (%.1f%%), perplexity %.1f",
             m, usage["tokens"], usage["codes_used"], tokenizer.vocab_size, 100 * usage["code_usage"], usage["perplexity"])
    log.info("wrote %s and %s", out.resolve(), hist.resolve())
    result.update(usage, histogram=str(hist), histogram_images=m, counts=counts)
    return result


# ============================================================================ entry points
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mcbeit-tokenizer", description="Train (train) or look at (inspect) a visual tokenizer.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,inspect}")
    add_train_arguments(sub.add_parser("train", help="train a VQ-VAE tokenizer", description=_TRAIN_DESCRIPTION,
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_inspect_arguments(sub.add_parser("inspect", help="token maps, reconstructions and codebook usage",
                                         description=_INSPECT_DESCRIPTION,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = args.command
    del args.command  # not a setting: keep it out of the checkpoints' args
    if command == "train":
        return _train(args)
    run_inspect(args)
    return 0


def main_train(argv: Sequence[str] | None = None) -> int:
    """`run_tokenizer_training.py`: the `train` subcommand's flags, without the subcommand."""
    return _train(get_train_parser().parse_args(argv))


def _train(args: argparse.Namespace) -> int:
    return run_parsed(args, run_train)


if __name__ == "__main__":
    sys.exit(main())
