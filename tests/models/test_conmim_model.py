"""ConMIMForMaskedImageModeling: the original's pre-training state dict (TencentARC/ConMIM modeling_pretrain.py with
use_mlp_projectors=True and run_conmim_pretraining.py's defaults: shared relative position bias, no absolute
position embedding, layer scale 0.1), its projector initialisation and forward, and fine-tuning from its file."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import mcbeit.models  # noqa: F401  (registers the names)
from mcbeit.models.beit import ConMIMForMaskedImageModeling
from mcbeit.models.beit_weights import load_for_finetuning
from mcbeit.models.classifier import classifier_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

STD = 0.02
# std of a standard normal truncated to [-1, 1]
TRUNC_STD = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def original_base_keys():
    """key -> shape of the original conmim_base_patch16_224 pre-training model, written out from modeling_pretrain.py
    / modeling_finetune.py (the original also saves rel_pos_bias.relative_position_index (197, 197): a persistent
    buffer there, non-persistent in timm, so not listed)."""
    D, H, V, hidden, out = 768, 12, 8192, 4096, 256
    keys = {
        "cls_token": (1, 1, D),
        "mask_token": (1, 1, D),
        "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,),
        "rel_pos_bias.relative_position_bias_table": ((2 * 14 - 1) ** 2 + 3, H),  # (732, 12)
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({
            b + "gamma_1": (D,), b + "gamma_2": (D,),
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.q_bias": (D,), b + "attn.v_bias": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
        })
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "lm_head.weight": (V, D), "lm_head.bias": (V,)})

    def batchnorm(prefix, width, affine=True):
        bn = {prefix + "running_mean": (width,), prefix + "running_var": (width,), prefix + "num_batches_tracked": ()}
        if affine:
            bn.update({prefix + "weight": (width,), prefix + "bias": (width,)})
        return bn

    keys["projectors.0.weight"] = (hidden, D)          # Linear(D, 4096, bias=False)
    keys.update(batchnorm("projectors.1.", hidden))      # BatchNorm1d(4096); 2 is ReLU
    keys["projectors.3.weight"] = (hidden, hidden)     # Linear(4096, 4096, bias=False)
    keys.update(batchnorm("projectors.4.", hidden))      # BatchNorm1d(4096); 5 is ReLU
    keys["projectors.6.weight"] = (out, hidden)        # Linear(4096, 256, bias=False)
    keys.update(batchnorm("projectors.7.", out, affine=False))  # BatchNorm1d(256, affine=False)
    return keys


def small(**kw):
    """A fast ConMIM: tiny width, 2 blocks, 64 px (16 patches), projector 64 -> 32."""
    for k, v in dict(img_size=64, depth=2, proj_hidden_dim=64, proj_dim=32, vocab_size=64).items():
        kw.setdefault(k, v)
    torch.manual_seed(kw.pop("seed", 0))
    return timm.create_model("conmim_tiny_patch16_224", **kw)


@pytest.fixture(scope="module")
def tiny128():
    """conmim_tiny_patch16_224 at 128 px with the recipe's projector (4096 -> 256): built once."""
    torch.manual_seed(0)
    return timm.create_model("conmim_tiny_patch16_224", img_size=128)


def test_base_has_the_originals_pretraining_keys():
    model = timm.create_model("conmim_base_patch16_224", device="meta")  # shapes only: nothing allocated
    assert isinstance(model, ConMIMForMaskedImageModeling)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = original_base_keys()
    assert sorted(set(own) - set(expected)) == [] and sorted(set(expected) - set(own)) == []
    assert own == expected
    assert len(own) == 205
    assert "projectors.7.weight" not in own and "projectors.7.bias" not in own  # affine=False


def test_projector_layout_and_init(tiny128):
    proj = tiny128.projectors
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, nn.Linear)] == [
        (192, 4096), (4096, 4096), (4096, 256)]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert proj[1].affine and proj[4].affine and not proj[7].affine
    for i in (0, 3, 6):  # the original's trunc_normal_(std=0.02, a=-0.02, b=0.02)
        w = proj[i].weight.detach()
        assert w.abs().max() <= STD
        assert abs(w.std().item() / (STD * TRUNC_STD) - 1) < 0.03, i
        assert abs(w.mean().item()) < 1e-3
    for i in (1, 4):  # PyTorch's BatchNorm defaults
        assert torch.equal(proj[i].weight, torch.ones(4096)) and torch.equal(proj[i].bias, torch.zeros(4096))
    for i in (1, 4, 7):
        assert not proj[i].running_mean.any() and bool((proj[i].running_var == 1).all())
        assert int(proj[i].num_batches_tracked) == 0


def test_tiny_at_128px_forward_shapes(tiny128):
    assert tiny128.patch_embed.num_patches == 64
    x = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    tiny128.train()
    features, projected = tiny128(x, mask)
    assert features.shape == (2, 64, 192) and projected.shape == (2, 64, 256)
    with torch.no_grad():
        features, projected = tiny128(x)
    assert features.shape == (2, 64, 192) and projected.shape == (2, 64, 256)
    with pytest.raises(ValueError, match="64 patches"):
        tiny128(x, torch.zeros(2, 196, dtype=torch.bool))


@pytest.mark.parametrize("train", [True, False])
def test_no_mask_is_an_all_false_mask(train):
    model = small().train(train)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
        b = model(x, torch.zeros(3, 16, dtype=torch.bool))
        c = model(x, torch.zeros(3, 4, 4, dtype=torch.bool))  # (B,h,w) as the loader gives it
    for one, other in ((a, b), (a, c)):
        torch.testing.assert_close(one[0], other[0], rtol=0, atol=0)
        torch.testing.assert_close(one[1], other[1], rtol=0, atol=0)


def test_forward_is_norm_then_projector_over_all_tokens_cls_dropped():
    model = small().train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        features, projected = model(x, mask)
        tokens = model.forward_features(x, mask)                       # (B,1+N,D) after the final norm
        z = model.projectors(tokens.reshape(-1, tokens.shape[-1]))     # BN statistics over B*(1+N) rows, CLS too
        patches_only = model.projectors(tokens[:, 1:].reshape(-1, tokens.shape[-1]))
    assert features.shape == (2, 16, 192) and projected.shape == (2, 16, 32)
    torch.testing.assert_close(features, tokens[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(projected, z.reshape(2, 17, -1)[:, 1:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(projected, patches_only.reshape(2, 16, -1), atol=1e-4)  # CLS is in the statistics
    with torch.no_grad():  # the mask is applied (masked patches enter as the mask token)
        unmasked, _ = model(x)
    assert not torch.allclose(features, unmasked, atol=1e-4)


def test_batchnorm_uses_batch_statistics_in_train_mode():
    model = small()
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(1, 3, 64, 64, generator=g) for _ in range(3))
    with torch.no_grad():
        model.train()
        f_ab, p_ab = model(torch.cat([a, b]))
        f_ac, p_ac = model(torch.cat([a, c]))
        # the backbone treats images one by one; the projector's BN mixes the batch
        torch.testing.assert_close(f_ab[0], f_ac[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(p_ab[0], p_ac[0], atol=1e-3)
        assert int(model.projectors[1].num_batches_tracked) == 2 and model.projectors[7].running_mean.any()
        model.eval()  # running statistics: each image alone
        _, q_ab = model(torch.cat([a, b]))
        _, q_ac = model(torch.cat([a, c]))
        torch.testing.assert_close(q_ab[0], q_ac[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_backbone_and_projector_not_lm_head():
    model = small().train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    _, projected = model(x, mask)
    projected.square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.projectors[0].weight.grad.abs().sum() > 0 and model.projectors[6].weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None  # ConMIM never uses the lm_head


def test_finetuning_drops_pretraining_heads_and_lists_them(tmp_path):
    conmim = small(img_size=224, depth=12, seed=3)
    with torch.no_grad():  # make the running statistics and num_batches_tracked non-trivial
        conmim.train()(torch.randn(2, 3, 224, 224))
    sd = conmim.state_dict()
    path = tmp_path / "conmim.pth"
    torch.save({"model": sd, "epoch": 1}, path)

    torch.manual_seed(0)
    classifier = timm.create_model("beit_tiny_patch16_224", **classifier_kwargs(nb_classes=10))  # mean pooling
    report = load_for_finetuning(str(path), classifier)
    heads = ["mask_token", "lm_head.weight", "lm_head.bias"] + [k for k in sd if k.startswith("projectors.")]
    assert len([k for k in sd if k.startswith("projectors.")]) == 16
    for k in heads:
        assert "pre-training only" in report.dropped[k], k
    for k in ("norm.weight", "norm.bias"):  # mean pooling: fc_norm starts fresh, as the original
        assert "fc_norm" in report.dropped[k], k
    assert set(report.dropped) == {*heads, "norm.weight", "norm.bias"}
    assert report.expanded_shared_rel_pos_bias
    own = classifier.state_dict()
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "blocks.0.gamma_1",
              "blocks.5.attn.q_bias"):
        assert torch.equal(own[k], sd[k]), k
    for i in range(12):
        assert torch.equal(own[f"blocks.{i}.attn.relative_position_bias_table"],
                           sd["rel_pos_bias.relative_position_bias_table"])
    summary = report.summary()
    assert "projectors." in summary and "lm_head" in summary and "mask_token" in summary

    # with the CLS token (no mean pooling) the final norm is loaded
    torch.manual_seed(0)
    token = timm.create_model("beit_tiny_patch16_224", **classifier_kwargs(nb_classes=10, use_mean_pooling=False))
    report = load_for_finetuning(str(path), token)
    assert set(report.dropped) == set(heads)
    assert torch.equal(token.state_dict()["norm.weight"], sd["norm.weight"])
