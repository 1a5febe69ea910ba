"""The VQ-VAE objective that trains a tokenizer: reconstruction + commitment, an EMA codebook.

:class:`VQVAETraining` wraps a ``customized`` tokenizer with the ``vq`` head (the small
DALL-E-style encoder, l2-normalised codes, an f8 conv decoder); ``mcbeit-tokenizer train``
(:mod:`mcbeit.tasks.tokenizer`) trains it through the run engine.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.objectives.codebook import all_reduce_sum, check_replicas, code_statistics, ema_update_, nearest_codes, perplexity, \
    reseed_dead_
from mcbeit.tokenizers.custom import CustomTokenizer

__all__ = ["VQVAETraining", "all_reduce_sum", "check_codebook_replicas", "usage_figures"]


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
    batch (rank 0's, broadcast). At the first update every code is initialised that way. The
    codebook arithmetic is :mod:`mcbeit.objectives.codebook`'s (shared with VQ-KD).
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
        ids = nearest_codes(flat, tok.codebook)                         # nearest unit code = largest cosine
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
        counts, sums = code_statistics(features, ids, vocab)            # the global batch's statistics
        used = ema_update_(codebook, counts, sums, self.decay)
        self.unused_steps.copy_(torch.where(used, torch.zeros_like(self.unused_steps), self.unused_steps + 1))

        dead = ~self.initialised.expand(vocab)
        if dead_code_steps > 0:
            dead = dead | (self.unused_steps >= dead_code_steps)
        reseed_dead_(codebook, dead, features)                          # rank 0's draw on every rank
        self.unused_steps.masked_fill_(dead, 0)
        reinit = dead.sum() * self.initialised                          # the first initialisation is not counted
        self.initialised.fill_(True)

        return {"perplexity": perplexity(counts), "code_usage": used.float().mean(), "dead_codes_reinit": reinit.float(),
                "counts": counts}


def check_codebook_replicas(vq: VQVAETraining) -> None:
    """Raise if the ranks' codebooks differ (their EMA updates must be identical: summed statistics, broadcast re-inits)."""
    check_replicas(vq.tokenizer.codebook, "the codebook")


def usage_figures(counts: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """Codes used, their fraction of the vocabulary and the perplexity exp(entropy) of a usage count vector."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    total = float(c.sum())
    p = c / max(total, 1.0)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    used = int((c > 0).sum())
    return {"codes_used": used, "code_usage": used / max(len(c), 1), "perplexity": math.exp(entropy),
            "tokens": int(total)}
