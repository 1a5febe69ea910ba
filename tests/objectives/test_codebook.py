"""The shared codebook against a literal re-statement of BEiT v2's NormEMAVectorQuantizer equations
(unilm beit2/norm_ema_quantizer.py: l2norm, sample_vectors, kmeans(use_cosine_sim=True), the training
branch of NormEMAVectorQuantizer.forward), written here from that file's math on small tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcbeit.objectives import codebook as cb
from mcbeit.tokenizers.vqkd import NormEMAQuantizer


# ---------------------------------------------------------------- the original's equations, literally
def lit_l2norm(t):
    return F.normalize(t, p=2, dim=-1)


def lit_sample_vectors(samples, num):
    n = samples.shape[0]
    if n >= num:
        indices = torch.randperm(n)[:num]
    else:
        indices = torch.randint(0, n, (num,))
    return samples[indices]


def lit_kmeans_cosine(samples, num_clusters, num_iters=10):
    dim = samples.shape[-1]
    means = lit_sample_vectors(samples, num_clusters)
    for _ in range(num_iters):
        dists = samples @ means.t()
        buckets = dists.max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        zero_mask = bins == 0
        bins_min_clamped = bins.masked_fill(zero_mask, 1)
        new_means = buckets.new_zeros(num_clusters, dim, dtype=samples.dtype)
        new_means.scatter_add_(0, buckets[:, None].expand(-1, dim), samples)
        new_means = new_means / bins_min_clamped[..., None]
        new_means = lit_l2norm(new_means)
        means = torch.where(zero_mask[..., None], means, new_means)
    return means, bins


def lit_assign(z_flat, weight):
    d = z_flat.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z_flat, weight)
    return torch.argmin(d, dim=1)


def lit_ema_step(z_flat, weight, decay):
    """One training forward's codebook update (single process: all_reduce is the identity)."""
    idx = lit_assign(z_flat, weight)
    encodings = F.one_hot(idx, weight.shape[0]).type(z_flat.dtype)
    bins = encodings.sum(0)
    zero_mask = bins == 0
    bins = bins.masked_fill(zero_mask, 1.0)
    embed_sum = z_flat.t() @ encodings
    embed_normalized = lit_l2norm((embed_sum / bins.unsqueeze(0)).t())
    embed_normalized = torch.where(zero_mask[..., None], weight, embed_normalized)
    new = weight.clone().mul_(decay).add_(embed_normalized, alpha=1 - decay)
    return lit_l2norm(new), idx, encodings.sum(0)


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# ---------------------------------------------------------------- tests
def test_assignment_is_the_originals():
    z, codes = unit(200, 8, 0), unit(16, 8, 1)
    ids = cb.nearest_codes(z, codes)
    assert torch.equal(ids, lit_assign(z, codes))
    assert torch.equal(ids, (z @ codes.t()).argmax(dim=1))          # on unit vectors: the largest cosine


def test_ema_update_is_the_originals_and_moves_only_codes_with_hits():
    z, codes = unit(40, 8, 2), unit(64, 8, 3)                        # 40 vectors, 64 codes: some get no hit
    ids = cb.nearest_codes(z, codes)
    expected, _, hits = lit_ema_step(z, codes.clone(), 0.99)
    mine = codes.clone()
    counts, sums = cb.code_statistics(z, ids, 64)
    used = cb.ema_update_(mine, counts, sums, 0.99)
    assert torch.equal(counts, hits)
    assert torch.equal(used, hits > 0) and 0 < int(used.sum()) < 64
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)
    assert torch.equal(mine[~used], codes[~used])                    # exactly unchanged without hits
    assert not torch.allclose(mine[used], codes[used])
    torch.testing.assert_close(mine.norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)


def test_kmeans_is_the_originals_with_and_without_replacement():
    for n, k in ((300, 16), (10, 16)):                               # randperm, then randint (fewer vectors than codes)
        z = unit(n, 8, 4)
        torch.manual_seed(7)
        means, bins = cb.kmeans_cosine(z, k, 10)
        torch.manual_seed(7)
        lit_means, lit_bins = lit_kmeans_cosine(z, k, 10)
        torch.testing.assert_close(means, lit_means, rtol=0, atol=1e-6)
        assert torch.equal(bins, lit_bins)
    assert int((bins == 0).sum()) >= 6                               # 10 vectors, 16 clusters: empty ones kept their mean


def test_quantizer_first_forward_is_kmeans_then_ema_as_the_original():
    """NormEMAQuantizer: the first training forward initialises by k-means on that batch, assigns with it; the
    EMA (done after the optimizer step here) then equals the original's in-forward update."""
    torch.manual_seed(0)
    z = torch.randn(2, 25, 8)                                        # (B, N, c), unnormalised as the task layer gives
    q = NormEMAQuantizer(16, 8, decay=0.99, kmeans=True).train()
    assert float(q.embedding.initted) == 0.0 and float(q.codebook.abs().sum()) == 0.0
    torch.manual_seed(1)
    z_q, loss, ids, flat = q(z)
    torch.manual_seed(1)
    lit_means, lit_bins = lit_kmeans_cosine(lit_l2norm(z).reshape(-1, 8), 16, 10)
    torch.testing.assert_close(q.codebook, lit_means, rtol=0, atol=1e-6)
    assert torch.equal(q.embedding.cluster_size, lit_bins.float()) and float(q.embedding.initted) == 1.0
    expected, lit_ids, _ = lit_ema_step(lit_l2norm(z).reshape(-1, 8), lit_means, 0.99)
    assert torch.equal(ids.flatten(), lit_ids)
    torch.testing.assert_close(loss, F.mse_loss(lit_means[lit_ids].view(2, 25, 8), lit_l2norm(z)), rtol=0, atol=1e-7)
    counts, sums = cb.code_statistics(flat, ids, 16)
    cb.ema_update_(q.codebook, counts, sums, 0.99)
    torch.testing.assert_close(q.codebook, expected, rtol=0, atol=1e-6)


def test_straight_through_gradient_reaches_the_features():
    z = torch.randn(1, 9, 4, requires_grad=True)
    q = NormEMAQuantizer(5, 4, kmeans=False).train()
    z_q, loss, _, _ = q(z)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_reseeding_replaces_only_dead_codes():
    codes, feats = unit(12, 6, 5), unit(30, 6, 6)
    mine = codes.clone()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 7]] = True
    cb.reseed_dead_(mine, dead, feats)
    assert torch.equal(mine[~dead], codes[~dead])
    near = (mine[dead] @ feats.t()).max(dim=1).values                # a perturbed feature of the batch
    assert bool((near > 0.99).all())
