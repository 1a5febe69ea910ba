"""Training a discrete tokenizer of one's own, and looking at any tokenizer.

:class:`TokenizerTrainingTask` fits a VQ-VAE (:class:`mcbeit.objectives.vqvae.VQVAETraining`: the
small DALL-E-style encoder, l2-normalised codes updated by EMA, a straight-through estimator, an f8
conv decoder) through the run engine. Its checkpoints (`checkpoint-<epoch>.pth`, which carry the
tokenizer file under their `'tokenizer'` key) and the `tokenizer.pth` written beside them at every
save are both usable as `--discrete_vae_type customized --discrete_vae_weight_path ...`.

:func:`inspect_tokenizer` draws, for a few images, the image, its token-id map in false colour and
(when the tokenizer has a decoder) the reconstruction from the ids, as one PNG grid; and the
codebook-usage histogram over N images as a second PNG, with the usage figures in the log.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from mcbeit.config.tokenizer import TokenizerInspectConfig, TokenizerTrainConfig
from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.folders import check_data_folder
from mcbeit.data.samplers import loader_worker_init
from mcbeit.data.transforms import OneViewTransform
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.distributed import resolve_device
from mcbeit.engine.logging import setup_logging
from mcbeit.engine.optim import build_optimizer
from mcbeit.engine.resume import load_resumed_weights
from mcbeit.engine.task import Mark, MeterSpec, StepOutput, Task, TrainData
from mcbeit.errors import InputError
from mcbeit.objectives.vqvae import VQVAETraining, check_codebook_replicas, usage_figures
from mcbeit.tokenizers import build_tokenizer
from mcbeit.tokenizers.custom import TOKENIZER_EXPORT_NAME, CustomTokenizer, custom_tokenizer_payload
from mcbeit.tokenizers.visualize import draw_token_grid, draw_usage_histogram, image_grid

log = logging.getLogger("mcbeit.tokenizer")

CHECKPOINT_FORMAT = "mcbeit-tokenizer-v1"
_USAGE = ("perplexity", "code_usage", "dead_codes_reinit")


class TokenizerTrainingTask(Task):
    """Train a VQ-VAE tokenizer as ``config`` says."""

    checkpoint_format = CHECKPOINT_FORMAT
    purpose = "training the tokenizer"
    meter = MeterSpec(("loss", "rec_loss", "commit_loss", *_USAGE, "grad_norm"), ("loss", "rec_loss", "commit_loss"),
                      {"loss": ("loss", "rec_loss", "commit_loss"), "codebook": _USAGE, "opt": ("lr", "grad_norm")},
                      {"rec": ("rec_loss", "{:.4f}"), "ppl": ("perplexity", "{:.0f}"),
                       "used": ("code_usage", "{:.2f}")}, host=("lr",), stop_hint="Lower --lr or set --clip_grad")

    def __init__(self, config: TokenizerTrainConfig):
        super().__init__(config)
        self.last: dict[str, torch.Tensor] = {}
        self.step = 0

    def check_inputs(self) -> None:
        if self.config.data_path:
            check_data_folder(self.config.data_path)

    def build_model(self, run) -> nn.Module:
        cfg = self.config
        tokenizer = build_vq_tokenizer(cfg)
        vq = VQVAETraining(tokenizer, commitment=cfg.commitment, decay=cfg.ema_decay)
        log.info("VQ-VAE tokenizer: %d codes x %d dims, n_hid %d, f%d (%dx%d tokens at %d px), %.2fM parameters",
                 cfg.vocab_size, cfg.embed_dim, cfg.hidden, tokenizer.downsample, *tokenizer.token_grid(),
                 cfg.input_size, sum(p.numel() for p in vq.parameters() if p.requires_grad) / 1e6)
        return vq

    def build_data(self, run) -> TrainData:
        cfg = self.config
        transform = OneViewTransform(cfg.input_size, scale=(cfg.crop_min_scale, 1.0), interpolation=cfg.interpolation,
                                     output_transform=self.model.tokenizer.input_transform)
        data = self.image_training_data(run, transform)
        log.info("data: %s, %s", data.described, transform)
        return data

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        return build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, opt_betas=cfg.opt_betas)

    # -- training -----------------------------------------------------------------------------------------
    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        """The VQ head's logit scale: pre-training's logits are -logit_scale x squared distance (the
        inverse of a softmax temperature; fixed, not trained)."""
        return {"vq_logit_scale": float(self.config.logit_scale)}

    def start_epoch(self, epoch: int, first: int = 0) -> None:
        self.step = epoch * self.run.steps_per_epoch + first
        vocab, device = self.config.vocab_size, self.run.device
        self.epoch_counts = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.epoch_reinit = torch.zeros((), device=device)

    def train_step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        run = self.run
        images = batch[0].to(run.device, non_blocking=True)                 # (B, 3, H, W), normalised
        with run.precision.autocast():
            out = run.forward(images)
        self.last = {"images": images, **{k: out[k] for k in ("features", "ids", "recon")}}
        return StepOutput(out["loss"], {k: out[k].detach() for k in ("loss", "rec_loss", "commit_loss")},
                          images.shape[0], batch[1].sum() if len(batch) > 1 else 0)

    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        """The codebook's EMA update (it needs to know now whether the step was applied: one host read)."""
        if bool(stepped):
            usage = self.model.update_codebook(self.last["features"], self.last["ids"], self.config.dead_code_steps)
        else:  # a non-finite step (the same on every rank): keep its features out of the codebook too
            zero = torch.zeros((), device=self.run.device)
            usage = {"counts": torch.zeros_like(self.epoch_counts), **{k: zero for k in _USAGE}}
        self.epoch_counts += usage["counts"].to(torch.float64)
        self.epoch_reinit += usage["dead_codes_reinit"]
        freq, self.step = self.config.image_freq, self.step + 1
        if freq > 0 and self.step % freq == 0 and self.run.info.is_main:
            self.run.writer.image(self.step - 1, "reconstruction/input_vs_recon", self._grid())
        return {k: usage[k] for k in _USAGE}

    def _grid(self) -> torch.Tensor:
        return image_grid(self.model.tokenizer, self.last["images"], self.last["recon"])

    def end_epoch(self, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        check_codebook_replicas(self.model)
        if self.run.info.is_main and self.last:
            self.run.writer.image(self.step - 1, "reconstruction/epoch_end", self._grid())
        stats = dict(train_stats)
        stats["dead_codes_reinit"] = float(self.epoch_reinit)               # a count: the epoch's total
        stats["psnr"] = 10.0 * math.log10(4.0 / max(stats["rec_loss"], 1e-12))  # [-1, 1] space: peak-to-peak 2
        usage = usage_figures(self.epoch_counts)                             # counts are already global
        stats.update(epoch_codes_used=usage["codes_used"], epoch_code_usage=usage["code_usage"],
                     epoch_perplexity=usage["perplexity"])
        return {**super().end_epoch(epoch, stats), "vocab_size": self.config.vocab_size,
                "n_parameters": self.run.n_parameters}

    def epoch_message(self, s: Mapping[str, Any]) -> str:
        return (f"rec_loss {s['train_rec_loss']:.4f} (PSNR {s['train_psnr']:.1f} dB), commit {s['train_commit_loss']:.4f}"
                f", codes used {s['train_epoch_codes_used']}/{self.config.vocab_size}, perplexity "
                f"{s['train_epoch_perplexity']:.1f} (batch mean {s['train_perplexity']:.1f}), "
                f"{s['train_dead_codes_reinit']:.0f} dead codes re-initialised, lr {s['train_lr']:.2e}")

    # -- checkpoints --------------------------------------------------------------------------------------
    def load_weights(self, ckpt: Mapping[str, Any], path: str) -> bool:
        cfg = self.config
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            if cfg.resume:
                source, fix = f"--resume {path}", "pass a checkpoint-<epoch>.pth of mcbeit-tokenizer train"
            else:
                source, fix = f"auto-resume from {path}", "start afresh with another --output_dir (or --start_over)"
            raise InputError(f"{source} is not a checkpoint of mcbeit-tokenizer train "
                             f"(format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); {fix}")
        load_resumed_weights(self.model, ckpt["model"], path, self.flags(), ckpt.get("args"))
        return True

    def state(self) -> dict[str, Any]:
        return {"tokenizer": custom_tokenizer_payload(self.model.tokenizer)}

    def saved(self, path: str, epoch: int | str) -> None:
        """`tokenizer.pth` beside every checkpoint: the tokenizer alone, for pre-training."""
        ckpt_io.save_atomic(custom_tokenizer_payload(self.model.tokenizer),
                            Path(self.config.output_dir) / TOKENIZER_EXPORT_NAME)


def build_vq_tokenizer(cfg: TokenizerTrainConfig) -> CustomTokenizer:
    """The untrained tokenizer (a ``customized`` one with the ``vq`` head) of ``cfg``."""
    return CustomTokenizer(image_size=cfg.input_size, head="vq", vocab_size=cfg.vocab_size, n_hid=cfg.hidden,
                           n_blk_per_group=cfg.blocks_per_group, embed_dim=cfg.embed_dim, logit_scale=cfg.logit_scale)


def histogram_path(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.stem + "_histogram.png")


@torch.no_grad()
def inspect_tokenizer(cfg: TokenizerInspectConfig) -> dict[str, Any]:
    """Write the token grid and the usage histogram; return the usage figures and the paths."""
    setup_logging(0)
    device = resolve_device(cfg.device)
    tokenizer = build_tokenizer(cfg.discrete_vae_type, cfg.discrete_vae_weight_path, cfg.input_size).to(device)
    transform = OneViewTransform(cfg.input_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)  # centre, [0,1]
    dataset = build_pretraining_dataset(cfg.data_path, cfg.data_set, transform, cfg.seed)
    name = f"{tokenizer.kind} ({'random weights' if tokenizer.random_weights else cfg.discrete_vae_weight_path})"

    def tokens_of(images: torch.Tensor) -> torch.Tensor:
        return tokenizer(tokenizer.input_transform(images.to(device))).argmax(dim=1)   # (B, h, w)

    picks = np.linspace(0, len(dataset) - 1, min(cfg.num_images, len(dataset))).round().astype(int)
    images = torch.stack([dataset[int(i)][0] for i in picks])           # spread over the (class-sorted) dataset
    ids = tokens_of(images)
    recon = tokenizer.decode(ids) if tokenizer.has_decoder else None
    if recon is None:
        log.info("%s has no decoder: the grid shows images and token maps only (no reconstructions)", name)
    grid = draw_token_grid(images, ids, recon, tokenizer.vocab_size,
                           title=f"{name}: {tokenizer.vocab_size} codes, {ids.shape[1]}x{ids.shape[2]} tokens")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    result: dict[str, Any] = {"grid": str(out), "vocab_size": tokenizer.vocab_size, "has_decoder": tokenizer.has_decoder}
    if recon is not None:
        result["grid_rec_mse"] = float(F.mse_loss(recon.cpu(), images).item())  # in [0, 1] pixel space

    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    m = min(cfg.histogram_images, len(dataset))
    order = np.random.default_rng(cfg.seed).permutation(len(dataset))[:m]
    for batch in DataLoader(Subset(dataset, order.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            worker_init_fn=loader_worker_init()):
        counts += torch.bincount(tokens_of(batch[0]).flatten().cpu(), minlength=tokenizer.vocab_size).double()
    usage = usage_figures(counts)
    title = (f"{name}: {usage['codes_used']}/{tokenizer.vocab_size} codes used ({100 * usage['code_usage']:.1f}%), "
             f"perplexity {usage['perplexity']:.1f}, {usage['tokens']} tokens from {m} images")
    hist = histogram_path(out)
    draw_usage_histogram(counts.numpy(), title).save(hist)
    log.info("codebook usage over %d images (%d tokens): %d of %d codes used (%.1f%%), perplexity %.1f",
             m, usage["tokens"], usage["codes_used"], tokenizer.vocab_size, 100 * usage["code_usage"], usage["perplexity"])
    log.info("wrote %s and %s", out.resolve(), hist.resolve())
    return {**result, **usage, "histogram": str(hist), "histogram_images": m, "counts": counts}
