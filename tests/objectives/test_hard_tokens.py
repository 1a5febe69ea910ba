"""HardTokenLoss (BEiT) against F.cross_entropy on the full tensors."""
import pytest
import torch
import torch.nn.functional as F

from mcbeit.objectives import HardTokenLoss

B, GRID, D, V = 3, 4, 8, 12
N = GRID * GRID


@pytest.mark.parametrize("counts", [(5, 1, 11), (16, 16, 16)])
def test_matches_cross_entropy_on_full_tensors(counts):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(D, V).double()
    tokenizer_logits = torch.randn(B, V, GRID, GRID, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, torch.randperm(N, generator=g)[:c]] = True

    out = HardTokenLoss()(features, head(features)[mask], tokenizer_logits, mask, 4.0)
    out["loss"].backward()
    ours = [features.grad.clone(), head.weight.grad.clone()]

    features.grad = None
    head.zero_grad(set_to_none=True)
    outputs = head(features)  # (B,N,V)
    input_ids = tokenizer_logits.argmax(1).flatten(1)  # (B,N)
    ref = F.cross_entropy(outputs[mask], input_ids[mask])
    ref.backward()

    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0], features.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], head.weight.grad, rtol=1e-5, atol=1e-5)
    acc = (outputs[mask].argmax(-1) == input_ids[mask]).double().mean()
    assert out["mlm_acc"].item() == pytest.approx(acc.item())
    assert not out["mlm_acc"].requires_grad


def test_temperature_does_not_matter_and_loss_is_float32():
    features = torch.randn(2, N, D)
    masked = torch.zeros(2, N, dtype=torch.bool)
    masked[:, :5] = True
    logits = torch.randn(10, V, dtype=torch.bfloat16)
    tokenizer_logits = torch.randn(2, V, GRID, GRID)
    a = HardTokenLoss()(features, logits, tokenizer_logits, masked, 0.5)["loss"]
    b = HardTokenLoss()(features, logits, tokenizer_logits, masked, 8.0)["loss"]
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)
