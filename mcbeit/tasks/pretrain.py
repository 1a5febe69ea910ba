"""mc-BEiT / BEiT pre-training: the command line of the original `run_mcbeit_pretraining.py`, and its main.

Every flag of the original keeps its meaning. Where the original's default cannot run (a cluster
`--data_path`, `--device cuda` on a CPU machine, `--model deit_base_patch16_224`), the default is
the embedded tiny run: `mcbeit-pretrain` with no flags pre-trains a tiny model on the embedded
images on whatever device is present.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

import timm
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

import mcbeit.models  # noqa: F401  (registers the model names with timm)
from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.masking import build_mask_generator, check_mask_flags
from mcbeit.data.samplers import build_train_loader
from mcbeit.data.transforms import TwoViewTransform
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.control import RunControl
from mcbeit.engine.distributed import DistInfo, wrap_ddp
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.loop import PretrainState, train_one_epoch
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.schedules import cosine_scheduler, temperature_schedule
from mcbeit.models.beit import BeitForMaskedImageModeling, patch_size_of
from mcbeit.models.checkpoint import filter_pretraining_state_dict
from mcbeit.models.recompute import DEFAULT_RECOMPUTE, set_recompute
from mcbeit.objectives import build_objective
from mcbeit.tasks.common import (add_compile_arguments, add_optimizer_arguments, add_recompute_argument,
                                 add_runtime_arguments, compile_modules, amp_settings, check_at_least,
                                 check_patch_grid, fill_defaults, epoch_save_due, finish_log, load_resumed_weights,
                                 log_plan, position_state, resume_path, resume_position, run_main, save_checkpoint,
                                 seed_everything, start_run, warmup_steps)
from mcbeit.tokenizers import TOKENIZER_KINDS, build_tokenizer

log = logging.getLogger("mcbeit.pretrain")

CHECKPOINT_FORMAT = "mcbeit-pretrain-v1"
DEFAULT_OUTPUT_DIR = "./output/mcbeit_pretrained"

# Defaults of the no-argument run on the embedded images (used only when --data_path is absent
# and the flag is not given); with --data_path the original's defaults apply.
# The embedded run uses 112 px images (7x7 patches, 19 masked: the original's 75/196 fraction) so
# that it finishes in about two minutes on a 2-core CPU.
EMBEDDED_DEFAULTS = {"epochs": 4, "warmup_epochs": 1, "save_ckpt_freq": 2, "batch_size": 32,
                     "input_size": 112, "second_input_size": 56, "num_mask_patches": 19}
ORIGINAL_DEFAULTS = {"epochs": 300, "warmup_epochs": 5, "save_ckpt_freq": 20, "batch_size": 64,
                     "input_size": 224, "second_input_size": 112, "num_mask_patches": 75}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "mcbeit-pretrain",
        description="mc-BEiT (default) or BEiT (--hard_targets) masked image modeling pre-training. "
                    "With no flags: a tiny model on the embedded images, on CPU or GPU, in minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    emb = " ({} on the embedded data when --data_path is not given)"
    p.add_argument("--batch_size", type=int, default=None,
                   help="per-process batch size; default 64" + emb.format(EMBEDDED_DEFAULTS["batch_size"]))
    p.add_argument("--epochs", type=int, default=None, help="default 300" + emb.format(EMBEDDED_DEFAULTS["epochs"]))
    p.add_argument("--save_ckpt_freq", type=int, default=None,
                   help="save every N epochs (and at the end); default 20" + emb.format(EMBEDDED_DEFAULTS["save_ckpt_freq"]))
    p.add_argument("--discrete_vae_weight_path", type=str, default=None,
                   help="tokenizer weights: a VQGAN folder (model.yaml + last.ckpt), a DALL-E folder "
                        "(encoder.pkl), or a customized tokenizer file; absent = RANDOM tokenizer weights")
    p.add_argument("--discrete_vae_type", type=str, default=None,
                   help=f"one of {', '.join(TOKENIZER_KINDS)}; default 'vqgan' (the original's) when "
                        "--discrete_vae_weight_path is given, else 'customized' (a small random tokenizer "
                        "that keeps the no-argument run fast)")
    # model
    p.add_argument("--model", default="beit_tiny_patch16_224_8k_vocab", type=str,
                   help="beit_{tiny,small,base,large}_patch16_224_8k_vocab (the original's default "
                        "deit_base_patch16_224 has no masked-image-modeling head)")
    p.add_argument("--rel_pos_bias", action="store_true", help="shared relative position bias (default on)")
    p.add_argument("--disable_rel_pos_bias", action="store_false", dest="rel_pos_bias")
    p.set_defaults(rel_pos_bias=True)
    p.add_argument("--abs_pos_emb", action="store_true", default=False)
    p.add_argument("--layer_scale_init_value", default=0.1, type=float,
                   help="0.1 for base, 1e-5 for large; 0 disables layer scale")
    # masking
    p.add_argument("--num_mask_patches", default=None, type=int,
                   help="patches masked per image (block masking); default 75" + emb.format(EMBEDDED_DEFAULTS["num_mask_patches"]))
    p.add_argument("--max_mask_patches_per_block", type=int, default=None)
    p.add_argument("--min_mask_patches_per_block", type=int, default=16)
    p.add_argument("--mask_ratio", default=0.75, type=float, help="fraction masked (random masking)")
    p.add_argument("--mask_type", type=str, default="block", choices=["block", "random"])
    p.add_argument("--input_size", default=None, type=int,
                   help="image size for the ViT; default 224" + emb.format(EMBEDDED_DEFAULTS["input_size"]))
    p.add_argument("--second_input_size", default=None, type=int,
                   help="image size for the tokenizer; default 112" + emb.format(EMBEDDED_DEFAULTS["second_input_size"]))
    p.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate")
    add_recompute_argument(p, DEFAULT_RECOMPUTE)
    add_compile_arguments(p)
    # optimisation
    add_optimizer_arguments(p, opt_betas=[0.9, 0.98], min_lr=1e-5,
                            warmup_epochs_help="LR warm-up epochs; default 5" + emb.format(EMBEDDED_DEFAULTS["warmup_epochs"]))
    p.add_argument("--no_loss_masked", action="store_true",
                   help="accepted for compatibility; the original never reads it")
    # objective
    p.add_argument("--omega", type=float, default=0.2, help="weight of the inter-patch refined target")
    p.add_argument("--temp", type=float, default=4.0, help="tokenizer softmax temperature")
    p.add_argument("--temp_warmup", type=float, default=4.0, help="temperature at epoch 0, warmed linearly to --temp")
    p.add_argument("--temp_warmup_epochs", type=int, default=30, help="length of the temperature warm-up")
    p.add_argument("--hard_targets", action="store_true", help="BEiT: cross-entropy on the hard token ids")
    p.add_argument("--detach_similarity", action="store_true",
                   help="stop the gradient through the inter-patch similarity (the reference lets it flow)")
    # augmentation
    p.add_argument("--train_interpolation", type=str, default="bicubic")
    p.add_argument("--second_interpolation", type=str, default="lanczos")
    # data and output
    p.add_argument("--data_path", default=None, type=str,
                   help="dataset folder (ImageFolder tree, or train/ + train_map.txt); default: the embedded images")
    p.add_argument("--imagenet_default_mean_and_std", default=False, action="store_true")
    p.add_argument("--data_set", default=None, choices=["CIFAR", "IMNET", "image_folder"],
                   help="dataset layout; default: detected from the folder (and said in the log)")
    add_runtime_arguments(p, output_dir=DEFAULT_OUTPUT_DIR)
    p.set_defaults(default_vae_type="vqgan")
    return p


def get_beit_args_parser() -> argparse.ArgumentParser:
    """BEiT's `run_beit_pretraining.py`: hard-token targets and the DALL-E tokenizer by default."""
    p = get_args_parser()
    p.prog = "mcbeit-pretrain-beit"
    p.description = "BEiT pre-training (hard visual-token targets); the flags of mcbeit-pretrain."
    p.set_defaults(hard_targets=True, default_vae_type="dall-e")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags whose default depends on whether the run uses the embedded data."""
    fill_defaults(args, EMBEDDED_DEFAULTS, ORIGINAL_DEFAULTS)
    if args.discrete_vae_type is None:
        args.discrete_vae_type = args.default_vae_type if args.discrete_vae_weight_path else "customized"
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    if args.log_dir is None and args.output_dir:
        args.log_dir = os.path.join(args.output_dir, "tensorboard")
    if len(args.opt_betas) != 2:
        raise SystemExit(f"--opt_betas takes two numbers, got {args.opt_betas}")
    check_at_least(args, 1, ("batch_size", "epochs", "save_ckpt_freq"))
    check_model_name(args.model)
    if patch := patch_size_of(args.model):  # the sizes are checked again with the model's own patch size
        check_geometry(args, patch)
    return args


def check_model_name(name: str) -> None:
    names = timm.list_models("beit_*_8k_vocab")
    if name not in names:
        what = "has no masked-image-modeling head" if timm.is_model(name) else "is not a pre-training model"
        raise SystemExit(f"--model {name} {what}; choose one of {names}")


def build_model(args: argparse.Namespace, vocab_size: int) -> BeitForMaskedImageModeling:
    check_model_name(args.model)
    model = timm.create_model(
        args.model, pretrained=False, drop_path_rate=args.drop_path,
        use_shared_rel_pos_bias=args.rel_pos_bias, use_abs_pos_emb=args.abs_pos_emb,
        init_values=args.layer_scale_init_value, vocab_size=vocab_size, img_size=args.input_size)
    return set_recompute(model, getattr(args, "recompute", DEFAULT_RECOMPUTE))


def check_geometry(args: argparse.Namespace, patch: int, tokenizer_down: int | None = None) -> tuple[int, int]:
    """The ViT's patch grid, once --input_size, --second_input_size and the masking flags are known to
    fit together. ``tokenizer_down`` None (at argument resolution, before the tokenizer is loaded):
    --second_input_size must be the grid side times a power of two (every tokenizer downsamples by
    one, 8 for the released ones); given: exactly the grid side times the tokenizer's downsampling."""
    window = check_patch_grid(args.input_size, patch, args.model)
    side, size = window[0], args.second_input_size
    if tokenizer_down is None:
        ratio = size // side if size > 0 and size % side == 0 else 0
        if ratio < 1 or ratio & (ratio - 1):
            raise SystemExit(
                f"--second_input_size {size} cannot give the tokenizer the ViT's {side}x{side} grid (--input_size "
                f"{args.input_size} / patch {patch}): it must be {side} x the tokenizer's downsampling (8 for every "
                f"released tokenizer); use --second_input_size {side * 8}")
    elif size % tokenizer_down or size // tokenizer_down != side:
        raise SystemExit(
            f"--second_input_size {size} gives the tokenizer a {size // tokenizer_down}x{size // tokenizer_down} grid "
            f"but the ViT has {window[0]}x{window[1]} patches; use --second_input_size {side * tokenizer_down}")
    try:
        check_mask_flags(args.mask_type, window, args.num_mask_patches, args.mask_ratio,
                         args.min_mask_patches_per_block, args.max_mask_patches_per_block)
    except ValueError as exc:
        raise SystemExit(f"{exc} (--input_size {args.input_size} gives {side}x{side} patches of {patch} px)") from None
    return window


def build_pretraining_tokenizer(args: argparse.Namespace):
    """The frozen tokenizer of --discrete_vae_type / --discrete_vae_weight_path at --second_input_size
    (pre-training needs only its logits, channels-last); weights it cannot read are an error naming the flags."""
    try:
        return build_tokenizer(args.discrete_vae_type, args.discrete_vae_weight_path, args.second_input_size,
                               load_decoder=False).channels_last()
    except (OSError, ValueError) as exc:
        path = args.discrete_vae_weight_path
        weights = f" --discrete_vae_weight_path {path}" if path else ""
        raise SystemExit(f"--discrete_vae_type {args.discrete_vae_type}{weights} --second_input_size "
                         f"{args.second_input_size}: {exc}") from None


def build_data(args: argparse.Namespace, window: tuple[int, int], tokenizer, info: DistInfo):
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if args.imagenet_default_mean_and_std
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    masks = build_mask_generator(args.mask_type, window, args.num_mask_patches, args.mask_ratio,
                                 args.min_mask_patches_per_block, args.max_mask_patches_per_block)
    transform = TwoViewTransform(args.input_size, args.second_input_size, args.train_interpolation,
                                 args.second_interpolation, mean, std, tokenizer.input_transform, masks)
    dataset = build_pretraining_dataset(args.data_path, args.data_set, transform, args.seed)
    loader, sampler, steps = build_train_loader(dataset, args.batch_size, args.num_workers,
                                                args.pin_mem and info.device.type == "cuda", args.seed,
                                                info.world_size, info.rank)
    log.info("data: %d images, %s; %s", len(dataset), masks, transform)
    return loader, sampler, steps


def restore(args, model: BeitForMaskedImageModeling, optimizer, scaler, steps_per_epoch: int,
            info: DistInfo) -> tuple[int, int, str | None]:
    """Load --resume (or the newest whole checkpoint with --auto_resume); return (start_epoch,
    steps already done in it, path). Our checkpoints also restore this rank's random generators, so
    the run continues bit for bit as if it had not stopped."""
    path = resume_path(args)
    if path is None:
        return args.start_epoch, 0, None
    ckpt = ckpt_io.load_training_checkpoint(path)
    state = filter_pretraining_state_dict(ckpt["model"], model)
    load_resumed_weights(model, state, path, args, ckpt.get("args"))
    ours = ckpt.get("format") == CHECKPOINT_FORMAT
    if ours and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    elif "optimizer" in ckpt:
        log.warning("%s was not written by mcbeit: its weights are loaded, its optimizer state is not "
                    "(parameter order differs between implementations)", path)
    start, first = resume_position(ckpt, path, steps_per_epoch, info, args.start_epoch, restore_random_state=ours)
    return start, first, path


def save(args, info: DistInfo, epoch: int, steps_done: int, steps_per_epoch: int, model, optimizer, scaler) -> str | None:
    """Checkpoint after ``steps_done`` steps of ``epoch`` (all of them at an epoch end). Every rank
    calls it (their random states are gathered); rank 0 writes. Returns the path on rank 0."""
    position = position_state(info, epoch, steps_done, steps_per_epoch)
    if not info.is_main:
        return None
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, **position,
             "args": ckpt_io.plain_args(args)}
    return os.path.abspath(save_checkpoint(args, epoch, state))


def run(args: argparse.Namespace) -> dict:
    """Pre-train as `args` say; return the last epoch's statistics."""
    info = start_run(args, resolve_defaults, "pre-training")

    seed_everything(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    tokenizer = build_pretraining_tokenizer(args).to(info.device)
    model = build_model(args, tokenizer.vocab_size)
    window = check_geometry(args, model.patch_embed.patch_size[0], tokenizer.downsample)
    args.window_size = list(window)
    model.to(info.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM parameters; tokenizer %s (vocabulary %d)", args.model, n_parameters / 1e6,
             args.discrete_vae_type, tokenizer.vocab_size)
    seed_everything(args.seed + info.rank)

    loader, sampler, steps_per_epoch = build_data(args, window, tokenizer, info)
    amp_dtype, scaler = amp_settings(args.amp, info.device)
    optimizer = build_optimizer(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                opt_eps=args.opt_eps, opt_betas=tuple(args.opt_betas), momentum=args.momentum)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                   warmup_epochs=args.warmup_epochs, warmup_steps=warmup_steps(args, steps_per_epoch))
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    temps = temperature_schedule(args.temp_warmup, args.temp, args.epochs, args.temp_warmup_epochs)
    start_epoch, first, resumed_from = restore(args, model, optimizer, scaler, steps_per_epoch, info)

    objective = build_objective(args.hard_targets, args.omega, args.detach_similarity)
    compile_modules(args, model, objective)
    ddp_model = wrap_ddp(model, info)
    writer = RunWriter(args.output_dir, args.log_dir, enabled=info.is_main and bool(args.output_dir))
    state = PretrainState(model=ddp_model, model_without_ddp=model, tokenizer=tokenizer, objective=objective,
                          optimizer=optimizer, scaler=scaler, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
                          dist=info, amp_dtype=amp_dtype, clip_grad=args.clip_grad, print_freq=args.print_freq,
                          max_bad_steps=args.max_bad_steps, max_bad_fraction=args.max_bad_fraction, writer=writer, params=[p for p in model.parameters() if p.requires_grad])
    log_plan(args, info, steps_per_epoch, amp_dtype, start_epoch, resumed_from)

    stats: dict = {}
    last_ckpt = resumed_from
    started = time.perf_counter()
    saving = bool(args.output_dir)
    resume_point = lambda e, done: save(args, info, e, done, steps_per_epoch, model, optimizer, scaler)  # noqa: E731
    control = RunControl.from_args(args, info, resume_point if saving else None, steps_per_epoch)
    try:
        with control:
            for epoch in range(start_epoch, args.epochs):
                sampler.set_epoch(epoch, start=first * args.batch_size)
                stats = train_one_epoch(state, loader, epoch, epoch * steps_per_epoch, float(temps[epoch]),
                                        steps_per_epoch, last_good_checkpoint=last_ckpt, first=first, control=control)
                first = 0
                last_ckpt = control.last_checkpoint or last_ckpt
                if epoch_save_due(args, epoch):
                    last_ckpt = save(args, info, epoch, steps_per_epoch, steps_per_epoch, model, optimizer, scaler)
                    if last_ckpt:
                        log.info("saved %s", last_ckpt)
                stats = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                         "temp": float(temps[epoch]), "n_parameters": n_parameters}
                writer.epoch(stats)
                log.info("epoch %d: loss %.4f, mlm_acc %.4f, lr %.2e, %d skipped images", epoch,
                         stats["train_loss"], stats["train_mlm_acc"], stats["train_lr"], stats["train_skipped_images"])
    finally:
        writer.close()
    finish_log(stats, started, args.output_dir)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    return _main(get_args_parser(), argv)


def main_beit(argv: Sequence[str] | None = None) -> int:
    return _main(get_beit_args_parser(), argv)


def _main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    return run_main(parser, argv, run)


if __name__ == "__main__":
    sys.exit(main())
