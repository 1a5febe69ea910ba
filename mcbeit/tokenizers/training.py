"""Training a VQ-VAE tokenizer: the model with its EMA codebook, and one epoch of its training.

:class:`VQVAETraining` wraps a ``customized`` tokenizer with the ``vq`` head (the small
DALL-E-style encoder, l2-normalised codes, an f8 conv decoder); ``mcbeit-tokenizer train``
(:mod:`mcbeit.tasks.tokenizer`) builds it, the data and the optimiser and calls
:func:`train_one_epoch` per epoch.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcbeit.engine.distributed import DistInfo, all_reduce_sum
from mcbeit.engine.logging import RunWriter
from mcbeit.engine.precision import autocast_context
from mcbeit.engine.meter import StepMeter
from mcbeit.engine.control import RunControl
from mcbeit.engine.optim import backward_and_step
from mcbeit.engine.schedules import apply_schedules
from mcbeit.tokenizers.custom import CustomTokenizer
from mcbeit.tokenizers.visualize import image_grid

log = logging.getLogger("mcbeit.tokenizer")

STEP_METRICS = ("loss", "rec_loss", "commit_loss", "perplexity", "code_usage", "dead_codes_reinit", "grad_norm")


class VQVAETraining(nn.Module):
    """A ``customized`` tokenizer with the ``vq`` head plus what training it needs.

    ``forward(images)`` (normalised, (B,3,H,W)): encoder -> unit features z -> nearest code e
    (cosine = squared distance on the sphere) -> straight-through -> decoder. Returns
    ``loss = rec_loss + commitment * commit_loss`` with ``rec_loss`` the MSE between the
    reconstruction and the input in the normalised space and ``commit_loss`` the mean of
    ``||z - sg(e)||^2`` per token; plus the ids, detached features and the reconstruction.

    The codebook is not trained by gradients: :meth:`update_codebook` moves each used code
    towards the normalised mean of the features assigned to it (EMA, ``decay``, then
    re-normalised, as BEiT v2's VQ-KD), with the counts and sums summed over ranks, and
    re-initialises every code unused for ``dead_code_steps`` steps from random features of the
    batch (rank 0's, broadcast). At the first update every code is initialised that way.
    """

    def __init__(self, tokenizer: CustomTokenizer, commitment: float = 0.25, decay: float = 0.99):
        super().__init__()
        if not isinstance(tokenizer, CustomTokenizer) or tokenizer.head != "vq":
            raise TypeError("VQVAETraining trains a CustomTokenizer with head='vq'")
        self.tokenizer = tokenizer
        self.commitment = float(commitment)
        self.decay = float(decay)
        self.register_buffer("unused_steps", torch.zeros(tokenizer.vocab_size, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        z = tok.encode(images)                                          # (B, D, h, w) unit, float32
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)                     # (B*h*w, D)
        with torch.no_grad():
            ids = (flat @ tok.codebook.float().t()).argmax(dim=1)       # nearest unit code = largest cosine
        codes = tok.codebook[ids].float()
        commit_loss = (flat - codes).pow(2).sum(dim=1).mean()
        quantised = flat + (codes - flat).detach()                      # straight-through estimator
        recon = tok.decoder(quantised.view(b, h, w, d).permute(0, 3, 1, 2))
        rec_loss = F.mse_loss(recon.float(), images.float())
        loss = rec_loss + self.commitment * commit_loss
        return {"loss": loss, "rec_loss": rec_loss.detach(), "commit_loss": commit_loss.detach(),
                "ids": ids.view(b, h, w), "features": flat.detach(), "recon": recon.detach()}

    @torch.no_grad()
    def update_codebook(self, features: torch.Tensor, ids: torch.Tensor, dead_code_steps: int) -> dict[str, torch.Tensor]:
        """EMA update and dead-code re-initialisation; returns the global batch's usage (device tensors)."""
        codebook = self.tokenizer.codebook
        vocab = codebook.shape[0]
        ids = ids.reshape(-1)
        counts = torch.bincount(ids, minlength=vocab).to(torch.float32)
        sums = torch.zeros(vocab, features.shape[1], dtype=torch.float32, device=features.device)
        sums.index_add_(0, ids, features.float())
        counts, sums = all_reduce_sum(counts), all_reduce_sum(sums)     # the global batch's statistics

        used = counts > 0
        target = F.normalize(sums, dim=1)
        moved = F.normalize(self.decay * codebook.float() + (1.0 - self.decay) * target, dim=1)
        codebook.copy_(torch.where(used[:, None], moved, codebook.float()).to(codebook.dtype))
        self.unused_steps.copy_(torch.where(used, torch.zeros_like(self.unused_steps), self.unused_steps + 1))

        dead = ~self.initialised.expand(vocab)
        if dead_code_steps > 0:
            dead = dead | (self.unused_steps >= dead_code_steps)
        picked = features[torch.randint(features.shape[0], (vocab,), device=features.device)].float()
        fresh = F.normalize(picked + 1e-3 * torch.randn_like(picked), dim=1)  # noise: no two identical codes
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(fresh, src=0)                                # every rank gets rank 0's choice
        codebook.copy_(torch.where(dead[:, None], fresh, codebook.float()).to(codebook.dtype))
        self.unused_steps.masked_fill_(dead, 0)
        reinit = dead.sum() * self.initialised                          # the first initialisation is not counted
        self.initialised.fill_(True)

        probs = counts / counts.sum().clamp_min(1.0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        return {"perplexity": entropy.exp(), "code_usage": used.float().mean(), "dead_codes_reinit": reinit.float(),
                "counts": counts}


def check_codebook_replicas(vq: VQVAETraining) -> None:
    """Raise if the ranks' codebooks differ (their EMA updates must be identical: summed statistics, broadcast re-inits)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    total = vq.tokenizer.codebook.detach().double().sum()
    spread = torch.stack([total, -total])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if float(spread[0] + spread[1]) > 1e-6 * max(1.0, abs(float(total))):
        raise RuntimeError("the codebook differs between ranks (sum %.9g here, max - min %.3g)"
                           % (float(total), float(spread[0] + spread[1])))


def usage_figures(counts: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Codes used, their fraction of the vocabulary and the perplexity exp(entropy) of a usage count vector."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    total = float(c.sum())
    p = c / max(total, 1.0)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    used = int((c > 0).sum())
    return {"codes_used": used, "code_usage": used / max(len(c), 1), "perplexity": math.exp(entropy),
            "tokens": int(total)}


def train_one_epoch(model: nn.Module, vq: VQVAETraining, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, lr_schedule: np.ndarray, loader: Iterable, epoch: int,
                    steps_per_epoch: int, info: DistInfo, amp_dtype: torch.dtype | None, writer: RunWriter,
                    last_good_checkpoint: str | None, *, clip_grad: float | None = None, dead_code_steps: int = 20,
                    print_freq: int = 10, image_freq: int = 0, max_bad_steps: int = 20,
                    max_bad_fraction: float = 1.0, first: int = 0, control: RunControl | None = None) -> dict[str, Any]:
    """One epoch of VQ-VAE training; ``model`` is ``vq`` or its DDP wrapper. Returns the epoch's statistics.

    ``first``: steps of this epoch already done (a mid-epoch resume; the loader starts there too);
    ``control`` writes mid-epoch checkpoints and stops on signals (:class:`RunControl`).

    Losses are means over ranks; codebook figures are of the global batch (their counts are summed
    over ranks in :meth:`VQVAETraining.update_codebook`); ``epoch_*`` figures count the whole epoch.
    """
    model.train()
    device = info.device
    params = [p for p in vq.parameters() if p.requires_grad]
    start_step = epoch * steps_per_epoch
    meter = StepMeter(STEP_METRICS, ("loss", "rec_loss", "commit_loss"),
                      {"loss": ("loss", "rec_loss", "commit_loss"),
                       "codebook": ("perplexity", "code_usage", "dead_codes_reinit"), "opt": ("lr", "grad_norm")},
                      {"rec": ("rec_loss", "{:.4f}"), "ppl": ("perplexity", "{:.0f}"), "used": ("code_usage", "{:.2f}")},
                      epoch=epoch, first_step=start_step + first, total_steps=steps_per_epoch - first, writer=writer,
                      show=info.is_main, last_good_checkpoint=last_good_checkpoint,
                      stop_hint="Lower --lr or set --clip_grad", max_bad_steps=max_bad_steps,
                      scaler_active=scaler is not None, max_bad_fraction=max_bad_fraction)
    epoch_counts = torch.zeros(vq.tokenizer.vocab_size, dtype=torch.float64, device=device)
    last_images = last_recon = None
    for step, batch in enumerate(loader, start=first):
        if step >= steps_per_epoch:
            break
        it = start_step + step
        lr = float(lr_schedule[it])
        apply_schedules(optimizer, lr, None)
        images = batch[0].to(device, non_blocking=True)                 # (B, 3, H, W), normalised
        with autocast_context(device, amp_dtype):
            out = model(images)
        grad_norm, _, stepped = backward_and_step(out["loss"], optimizer, scaler, params, clip_grad)
        if bool(stepped):  # read now (a device flag with fused AdamW): the codebook update depends on it
            usage = vq.update_codebook(out["features"], out["ids"], dead_code_steps)
        else:  # a non-finite step (the same on every rank): keep its features out of the codebook too
            zero = torch.zeros((), device=device)
            usage = {"counts": torch.zeros_like(epoch_counts), "perplexity": zero, "code_usage": zero,
                     "dead_codes_reinit": zero}
        epoch_counts += usage["counts"].to(torch.float64)
        meter.add({"loss": out["loss"].detach(), "grad_norm": grad_norm,
                   **{k: out[k] for k in ("rec_loss", "commit_loss")},
                   **{k: usage[k] for k in ("perplexity", "code_usage", "dead_codes_reinit")}},
                  {"lr": lr}, images.shape[0], skipped=batch[1].sum() if len(batch) > 1 else 0, stepped=stepped)
        last_images, last_recon = images, out["recon"]
        if meter.steps % print_freq == 0:
            meter.flush()
        if image_freq > 0 and (it + 1) % image_freq == 0 and info.is_main:
            writer.image(it, "reconstruction/input_vs_recon", image_grid(vq.tokenizer, images, out["recon"]))
        if control is not None:
            control.after_step(epoch, step + 1, it + 1, meter)
    stats: dict[str, Any] = meter.epoch_stats()
    if info.is_main and last_images is not None:
        writer.image(start_step + meter.steps - 1, "reconstruction/epoch_end",
                     image_grid(vq.tokenizer, last_images, last_recon))

    stats["dead_codes_reinit"] = meter.totals["dead_codes_reinit"]     # a count: the epoch's total
    stats["psnr"] = 10.0 * math.log10(4.0 / max(stats["rec_loss"], 1e-12))  # [-1, 1] space: peak-to-peak 2
    epoch_usage = usage_figures(epoch_counts)                           # counts are already global
    stats.update({"epoch_codes_used": epoch_usage["codes_used"], "epoch_code_usage": epoch_usage["code_usage"],
                  "epoch_perplexity": epoch_usage["perplexity"]})
    return stats
