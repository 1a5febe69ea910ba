"""The l2-normalised EMA codebook: the one implementation the VQ-VAE and VQ-KD tokenizers share.

A codebook is a (V, D) tensor of unit rows. For unit features z (N, D):

    nearest      ids_n  = argmin_v ||z_n||^2 + ||e_v||^2 - 2 z_n . e_v    (= largest cosine)
    EMA update   count_v = #{n : ids_n = v},  sum_v = sum_{ids_n = v} z_n      (both summed over ranks)
                 e_v   <- l2norm(decay * e_v + (1 - decay) * l2norm(sum_v / count_v))   where count_v > 0
                 (codes without hits keep their vector)
    k-means init 10 iterations of spherical k-means (assignment by dot product, means l2-normalised,
                 an empty cluster keeps its mean); the initial means are V vectors of the batch, drawn
                 without replacement (``randperm``) when it holds at least V vectors, with replacement
                 (``randint``) otherwise
    re-seeding   dead codes are replaced by random (slightly perturbed) features of the batch

These are the equations of BEiT v2's ``NormEMAVectorQuantizer`` (unilm ``beit2/norm_ema_quantizer.py``:
``l2norm``, ``kmeans``, ``EmbeddingEMA.init_embed_``, the training branch of ``forward``), checked against
a literal re-statement of them in ``tests/objectives/test_codebook.py``. One deliberate difference: with
several processes :func:`kmeans_init` runs on rank 0's batch and broadcasts the result. The original runs
k-means on every rank's own batch and never synchronises, so each rank would start with another codebook
(and the EMA updates, summed over ranks, would then move different codebooks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def l2norm(t: Tensor) -> Tensor:
    """Rows scaled to unit length (``F.normalize(p=2, dim=-1)``, eps 1e-12 as the original)."""
    return F.normalize(t, p=2, dim=-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (``t`` itself in one process): the global batch's statistics."""
    if not _distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_from_rank0(t: Tensor) -> Tensor:
    """``t`` as rank 0 has it, on every rank (in place; ``t`` itself in one process)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code of each row of ``z`` (N, D) in ``codebook`` (V, D): (N,) int64.

    Squared Euclidean distance as the original writes it, in float32 with autocast off; on unit
    vectors it is ``2 - 2 cos``, so the nearest code is the one of largest cosine."""
    with torch.autocast(z.device.type, enabled=False):
        z, e = z.float(), codebook.float()
        d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2.0 * (z @ e.t())   # (N, V)
        return d.argmin(dim=1)


@torch.no_grad()
def code_statistics(z: Tensor, ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Hits per code (V,) and the sum of the features assigned to each code (V, D), summed over ranks."""
    ids = ids.reshape(-1)
    counts = torch.bincount(ids, minlength=vocab).to(torch.float32)                   # (V,)
    sums = torch.zeros(vocab, z.shape[-1], dtype=torch.float32, device=z.device)
    sums.index_add_(0, ids, z.reshape(-1, z.shape[-1]).float())                        # (V, D)
    return all_reduce_sum(counts), all_reduce_sum(sums)


@torch.no_grad()
def ema_update_(codebook: Tensor, counts: Tensor, sums: Tensor, decay: float) -> Tensor:
    """Move every code that got hits towards the unit mean of its features; in place. Returns the mask of
    moved codes (V,). ``counts``/``sums`` are the global batch's (:func:`code_statistics`)."""
    used = counts > 0                                                                  # (V,)
    mean = l2norm(sums / counts.clamp_min(1.0)[:, None])                               # (V, D) unit means
    old = codebook.float()
    moved = l2norm(decay * old + (1.0 - decay) * mean)
    codebook.copy_(torch.where(used[:, None], moved, old).to(codebook.dtype))
    return used


@torch.no_grad()
def sample_vectors(samples: Tensor, num: int) -> Tensor:
    """``num`` rows of ``samples``: without replacement when there are enough, with replacement otherwise."""
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device)
    return samples[idx]


@torch.no_grad()
def kmeans_cosine(samples: Tensor, num_clusters: int, num_iters: int = 10) -> tuple[Tensor, Tensor]:
    """Spherical k-means of unit ``samples`` (N, D): the means (K, D) and the last assignment's bins (K,)."""
    samples = samples.float()
    means = sample_vectors(samples, num_clusters)                                      # (K, D)
    bins = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        buckets = (samples @ means.t()).max(dim=-1).indices                            # (N,) most similar mean
        bins = torch.bincount(buckets, minlength=num_clusters)                         # (K,)
        empty = bins == 0
        new = torch.zeros_like(means).index_add_(0, buckets, samples)                  # (K, D) sums
        new = l2norm(new / bins.masked_fill(empty, 1)[:, None])
        means = torch.where(empty[:, None], means, new)                                # empty: keep the mean
    return means, bins


@torch.no_grad()
def kmeans_init(samples: Tensor, num_clusters: int, num_iters: int = 10) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_cosine` on rank 0's ``samples``, broadcast to every rank (see the module doc)."""
    if not _distributed():
        return kmeans_cosine(samples, num_clusters, num_iters)
    means = torch.empty(num_clusters, samples.shape[-1], dtype=torch.float32, device=samples.device)
    bins = torch.empty(num_clusters, dtype=torch.long, device=samples.device)
    if dist.get_rank() == 0:
        m, b = kmeans_cosine(samples, num_clusters, num_iters)
        means.copy_(m)
        bins.copy_(b)
    return broadcast_from_rank0(means), broadcast_from_rank0(bins)


@torch.no_grad()
def random_codes(features: Tensor, num: int, noise: float = 1e-3) -> Tensor:
    """``num`` unit vectors: random rows of ``features`` (N, D) plus a little noise (so no two codes are
    identical), rank 0's draw on every rank. Draws from the global RNG on every rank."""
    picked = features[torch.randint(features.shape[0], (num,), device=features.device)].float()
    fresh = l2norm(picked + noise * torch.randn_like(picked))
    return broadcast_from_rank0(fresh)


@torch.no_grad()
def reseed_dead_(codebook: Tensor, dead: Tensor, features: Tensor) -> Tensor:
    """Replace the codes where ``dead`` (V,) is True by :func:`random_codes` of ``features``; in place.
    The random draw happens whether or not a code is dead (so every step uses the RNG alike)."""
    fresh = random_codes(features, codebook.shape[0])
    codebook.copy_(torch.where(dead[:, None], fresh, codebook.float()).to(codebook.dtype))
    return dead


def check_replicas(t: Tensor, what: str) -> None:
    """Raise if ``t`` differs between the ranks (compared by its sum; a no-op in one process)."""
    if not _distributed():
        return
    total = t.detach().double().sum()
    spread = torch.stack([total, -total])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if float(spread[0] + spread[1]) > 1e-6 * max(1.0, abs(float(total))):
        raise RuntimeError("%s differs between ranks (sum %.9g here, max - min %.3g)"
                           % (what, float(total), float(spread[0] + spread[1])))


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a usage-count vector (a device scalar)."""
    probs = counts / counts.sum().clamp_min(1.0)
    return (-(probs * probs.clamp_min(1e-12).log()).sum()).exp()
