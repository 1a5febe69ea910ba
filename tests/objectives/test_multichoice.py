"""MultiChoiceLoss against a literal transcription of the original mc-BEiT step on full tensors."""
import pytest
import torch
import torch.nn.functional as F

from mcbeit.bench.reference import literal_loss
from mcbeit.objectives import HardTokenLoss, MultiChoiceLoss, build_objective

B, GRID, D, V = 3, 4, 8, 12
N = GRID * GRID
MASKED_COUNTS = (5, 1, 11)  # ragged, one image with a single masked patch


def ragged_mask(counts=MASKED_COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, torch.randperm(N, generator=g)[:c]] = True
    return mask


def make_inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, D, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(D, V).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    tokenizer_logits = 3 * torch.randn(B, V, GRID, GRID, generator=g, dtype=dtype)
    return features, head, tokenizer_logits, ragged_mask(seed=seed)


def literal_original(features, head, tokenizer_logits, mask, temp, omega, detach_similarity):
    """The original engine_for_pretraining.py step, on the full B x N x V tensors (the benchmark's
    reference formulation: one statement of the literal formula for both)."""
    return literal_loss(features, head(features), tokenizer_logits, mask, temp, omega, detach_similarity)


def loss_and_grads(loss_fn, features, head, tokenizer_logits, mask, temp):
    features.grad = None
    head.zero_grad(set_to_none=True)
    masked_logits = head(features)[mask]  # (M,V) row order of mask.nonzero()
    out = loss_fn(features, masked_logits, tokenizer_logits, mask, temp)
    out["loss"].backward()
    return out, [features.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]


@pytest.mark.parametrize("detach_similarity", [False, True])
@pytest.mark.parametrize("omega", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("temp", [4.0, 0.7])
def test_matches_literal_original(omega, temp, detach_similarity):
    features, head, tokenizer_logits, mask = make_inputs()
    ours, ours_grads = loss_and_grads(
        MultiChoiceLoss(omega=omega, detach_similarity=detach_similarity), features, head, tokenizer_logits, mask, temp)

    features.grad = None
    head.zero_grad(set_to_none=True)
    ref_loss, ref_acc = literal_original(features, head, tokenizer_logits, mask, temp, omega, detach_similarity)
    ref_loss.backward()
    ref_grads = [features.grad, head.weight.grad, head.bias.grad]

    torch.testing.assert_close(ours["loss"], ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ours["mlm_acc"].item() == pytest.approx(ref_acc.item())
    assert not ours["mlm_acc"].requires_grad


@pytest.mark.parametrize("omega", [0.2, 1.0])
def test_similarity_gradient_flows_unless_detached(omega):
    features, head, tokenizer_logits, mask = make_inputs(seed=1)
    _, flowing = loss_and_grads(MultiChoiceLoss(omega, detach_similarity=False), features, head, tokenizer_logits, mask, 2.0)
    _, detached = loss_and_grads(MultiChoiceLoss(omega, detach_similarity=True), features, head, tokenizer_logits, mask, 2.0)
    assert not torch.allclose(flowing[0], detached[0], atol=1e-8)  # features: W's path differs
    torch.testing.assert_close(flowing[1], detached[1])  # head: only through the logits


def test_omega_zero_is_soft_cross_entropy():
    features, head, tokenizer_logits, mask = make_inputs(seed=2)
    masked_logits = head(features)[mask]
    out = MultiChoiceLoss(omega=0.0)(features, masked_logits, tokenizer_logits, mask, 3.0)
    soft = F.softmax(tokenizer_logits / 3.0, dim=1).flatten(2).transpose(1, 2)[mask]
    torch.testing.assert_close(out["loss"], F.cross_entropy(masked_logits, soft))


def test_mlm_acc_is_a_direct_count():
    mask = ragged_mask()
    M = int(mask.sum())
    tokenizer_logits = torch.randn(B, V, GRID, GRID)
    ids = tokenizer_logits.argmax(1).flatten(1)[mask]  # (M,)
    predicted = ids.clone()
    predicted[::3] = (predicted[::3] + 1) % V  # wrong on every third masked patch
    masked_logits = F.one_hot(predicted, V).float() * 10
    features = torch.randn(B, N, D)
    expected = (predicted == ids).sum().item() / M
    for loss_fn in (MultiChoiceLoss(), HardTokenLoss()):
        acc = loss_fn(features, masked_logits, tokenizer_logits, mask, 4.0)["mlm_acc"]
        assert acc.item() == pytest.approx(expected)


def test_float32_under_bf16_autocast():
    features, head, tokenizer_logits, mask = make_inputs(seed=3, dtype=torch.float32)
    loss_fn = MultiChoiceLoss(omega=0.2)
    with torch.no_grad():
        reference = loss_fn(features, head(features)[mask], tokenizer_logits, mask, 4.0)["loss"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masked_logits = head(features)[mask]
            assert masked_logits.dtype == torch.bfloat16
            out = loss_fn(features.bfloat16(), masked_logits, tokenizer_logits.bfloat16(), mask, 4.0)
    assert out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], reference, rtol=2e-2, atol=2e-2)


def test_no_masked_patch_is_a_clear_error():
    features, head, tokenizer_logits, _ = make_inputs()
    mask = torch.zeros(B, N, dtype=torch.bool)
    with pytest.raises(ValueError, match="no masked patch"):
        MultiChoiceLoss()(features, head(features)[mask], tokenizer_logits, mask, 4.0)


def test_build_objective():
    assert isinstance(build_objective(True, 0.2, False), HardTokenLoss)
    loss = build_objective(False, omega=0.5, detach_similarity=True)
    assert isinstance(loss, MultiChoiceLoss) and loss.omega == 0.5 and loss.detach_similarity
    with pytest.raises(ValueError, match="omega"):
        MultiChoiceLoss(omega=1.5)
