"""--recompute: every mode trains the same numbers; selective and full keep less for backward."""
import copy

import pytest
import timm
import torch
from torch.profiler import ProfilerActivity, profile

import mcbeit.models  # noqa: F401  (registers the pre-training names)
from mcbeit.models.recompute import RECOMPUTE_MODES, SelectiveRecomputeBlock, recompute_mode, set_recompute
from mcbeit.models.classifier import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

B, N = 2, 196


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("beit_tiny_patch16_224_8k_vocab", drop_path_rate=0.2, vocab_size=64, **kwargs).train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, N, generator=g) < 0.4
    return torch.randn(B, 3, 224, 224, generator=g), mask


def _loss(model, x, mask):
    features, logits = model(x, mask)                        # (B,N,D), (M,V)
    return torch.log_softmax(logits.float(), -1)[:, 0].mean() + features.square().mean()


def _train(mode: str, steps: int = 2):
    """Two AdamW steps with drop path active; returns losses, final weights and the RNG state after."""
    model = set_recompute(_model(), mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, mask = _inputs()
    torch.manual_seed(5)  # the drop-path draws
    losses = []
    for _ in range(steps):
        loss = _loss(model, x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, torch.rand(3)


def test_every_mode_trains_the_same_numbers_and_leaves_the_rng_where_plain_training_does():
    losses, weights, rng_after = _train("none")
    for mode in ("selective", "full"):
        other_losses, other_weights, other_rng = _train(mode)
        assert other_losses == losses, mode                  # drop path replays the same draws
        for key, value in weights.items():
            torch.testing.assert_close(other_weights[key], value, rtol=0, atol=1e-6, msg=f"{mode}: {key}")
        assert torch.equal(other_rng, rng_after), mode


def _kept_bytes(model, x, mask) -> int:
    """Bytes allocated by the forward pass and still held when it returns: what backward keeps."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x, mask)
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    del out
    return kept


def test_selective_drops_the_gelu_and_layer_norm_outputs_of_every_block():
    model = _model()
    x, mask = _inputs()
    kept = {}
    for mode in ("none", "selective", "full"):
        set_recompute(model, mode)
        assert recompute_mode(model) == mode
        kept[mode] = _kept_bytes(model, x, mask)
    depth, dim, tokens = len(model.blocks), model.embed_dim, N + 1
    gelu = B * tokens * 4 * dim * 4                          # (B,1+N,4D) fp32
    norms = 2 * B * tokens * dim * 4                         # norm1 and norm2 outputs, (B,1+N,D) fp32
    assert kept["selective"] <= kept["none"] - depth * (gelu + norms)
    assert kept["full"] < kept["selective"] / 4


def test_evaluation_and_no_grad_run_the_plain_block():
    model = set_recompute(_model(), "selective")
    x, mask = _inputs()
    with torch.no_grad():
        train_out = model(x, mask)[1]
    model.eval()
    eval_kept = _kept_bytes(model, x, mask)
    plain = set_recompute(copy.deepcopy(model), "none")
    assert eval_kept == _kept_bytes(plain, x, mask)
    assert train_out.shape[0] == int(mask.sum())


def test_the_state_dict_and_classifiers_are_unchanged():
    model = _model()
    keys = list(model.state_dict())
    set_recompute(model, "selective")
    assert list(model.state_dict()) == keys
    assert all(type(b) is SelectiveRecomputeBlock for b in model.blocks)
    classifier = set_recompute(build_classifier("beit_tiny_patch16_224", nb_classes=5), "selective")
    assert recompute_mode(classifier) == "selective"
    logits = classifier(torch.randn(2, 3, 224, 224))
    logits.sum().backward()
    assert classifier.head.weight.grad is not None
    set_recompute(classifier, "none")
    assert not any(type(b) is SelectiveRecomputeBlock for b in classifier.blocks)


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="selective, full, none"):
        set_recompute(_model(), "some")
    assert RECOMPUTE_MODES == ("selective", "full", "none")
