"""BeitForMaskedImageModeling: registry, state-dict layout, original initialisation, forward."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.beit import Beit

import mcbeit.models  # noqa: F401  (registers the names)
from mcbeit.models.beit import BeitForMaskedImageModeling

MIM_NAMES = {
    'beit_tiny_patch16_224_8k_vocab': (192, 12, 3),
    'beit_small_patch16_224_8k_vocab': (384, 12, 6),
    'beit_base_patch16_224_8k_vocab': (768, 12, 12),
    'beit_large_patch16_224_8k_vocab': (1024, 24, 16),
}
STD = 0.02
# std of a standard normal truncated to [-1, 1]
TRUNC_STD = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


@pytest.fixture(scope='module')
def base():
    torch.manual_seed(0)
    return timm.create_model('beit_base_patch16_224_8k_vocab')


def tiny(**kw):
    kw.setdefault('img_size', 64)  # N = 16 patches: fast
    kw.setdefault('depth', 2)
    return timm.create_model('beit_tiny_patch16_224_8k_vocab', **kw)


@pytest.mark.parametrize('name', sorted(MIM_NAMES))
def test_registered_names_create_models(name):
    assert name in timm.list_models(name)
    dim, depth, heads = MIM_NAMES[name]
    model = timm.create_model(name, depth=1)  # full width and heads, one block: fast
    assert type(model) is BeitForMaskedImageModeling
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
    assert model.lm_head.weight.shape == (8192, dim)
    assert model.pos_embed is None and model.rel_pos_bias is not None
    assert model.blocks[0].attn.relative_position_bias_table is None
    assert torch.allclose(model.blocks[0].gamma_1, torch.full((dim,), 0.1))
    assert model.norm.eps == 1e-6
    assert model.pretrained_cfg['url'] == ''


def test_default_depths():
    assert len(timm.create_model('beit_tiny_patch16_224_8k_vocab', img_size=32).blocks) == 12
    with pytest.raises(ValueError, match='never downloads'):
        timm.create_model('beit_tiny_patch16_224_8k_vocab', pretrained=True)


def test_base_state_dict_layout(base):
    sd = base.state_dict()
    expected = {
        'cls_token': (1, 1, 768),
        'mask_token': (1, 1, 768),
        'patch_embed.proj.weight': (768, 3, 16, 16),
        'patch_embed.proj.bias': (768,),
        'rel_pos_bias.relative_position_bias_table': (732, 12),
        'norm.weight': (768,),
        'norm.bias': (768,),
        'lm_head.weight': (8192, 768),
        'lm_head.bias': (8192,),
    }
    per_block = {
        'gamma_1': (768,), 'gamma_2': (768,),
        'norm1.weight': (768,), 'norm1.bias': (768,),
        'attn.q_bias': (768,), 'attn.v_bias': (768,),
        'attn.qkv.weight': (2304, 768),
        'attn.proj.weight': (768, 768), 'attn.proj.bias': (768,),
        'norm2.weight': (768,), 'norm2.bias': (768,),
        'mlp.fc1.weight': (3072, 768), 'mlp.fc1.bias': (3072,),
        'mlp.fc2.weight': (768, 3072), 'mlp.fc2.bias': (768,),
    }
    for i in range(12):
        expected.update({f'blocks.{i}.{k}': v for k, v in per_block.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # hence: no k_bias, no pos_embed, no head / fc_norm, no relative_position_index buffers
    assert not any('k_bias' in k or 'relative_position_index' in k for k in sd)


def test_constructor_options_of_the_original():
    m = tiny(use_abs_pos_emb=True)
    assert m.state_dict()['pos_embed'].shape == (1, 17, 192)
    assert m.no_weight_decay() == {'pos_embed', 'cls_token'}

    m = tiny(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    sd = m.state_dict()
    assert m.rel_pos_bias is None and 'rel_pos_bias.relative_position_bias_table' not in sd
    assert sd['blocks.1.attn.relative_position_bias_table'].shape == ((2 * 4 - 1) ** 2 + 3, 3)

    m = tiny(num_classes=1000, drop_block_rate=None, drop_path_rate=0.1, init_values=0.0,
             vocab_size=100, img_size=112)
    assert m.patch_embed.num_patches == 49
    assert m.blocks[0].gamma_1 is None and 'blocks.0.gamma_1' not in m.state_dict()
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(m.blocks[0].drop_path1, nn.Identity)
    assert m.lm_head.out_features == 100
    assert isinstance(m.head, nn.Identity) and isinstance(m.fc_norm, nn.Identity)
    with pytest.raises(ValueError):
        tiny(global_pool='avg')


def test_no_weight_decay_is_the_originals(base):
    assert base.no_weight_decay() == {'pos_embed', 'cls_token'}


def test_original_initialisation(base):
    bound = STD * (1 + 1e-6)
    linears = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    assert any(n == 'lm_head' for n, _ in linears)
    for name, m in linears:
        w = m.weight.detach()
        scale = 1.0
        if name.startswith('blocks.') and name.endswith(('attn.proj', 'mlp.fc2')):
            scale = math.sqrt(2 * (int(name.split('.')[1]) + 1))  # fix_init_weight
        w = w * scale
        assert w.abs().max() <= bound, name
        assert w.abs().max() > 0.98 * STD, name  # truncated at +-std, not merely small
        assert w.std().item() == pytest.approx(STD * TRUNC_STD, rel=0.05), name
        assert m.bias is None or torch.count_nonzero(m.bias) == 0, name
    conv = base.patch_embed.proj
    assert conv.weight.abs().max() <= bound and conv.weight.std().item() == pytest.approx(STD * TRUNC_STD, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    for p in (base.cls_token, base.mask_token):
        assert p.abs().max() <= bound and p.abs().max() > 0
    # the rescale really happened, layer by layer (statistically, on 768x768 / 768x3072 weights)
    for i, blk in enumerate(base.blocks):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(STD * TRUNC_STD / math.sqrt(2 * (i + 1)), rel=0.05)
    assert torch.count_nonzero(base.rel_pos_bias.relative_position_bias_table) == 0
    for blk in base.blocks:
        assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.v_bias) == 0
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
    for m in base.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0


def test_init_weights_reset_redoes_the_original_init():
    torch.manual_seed(0)
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)
    m.init_weights()  # needs_reset=True: tables, q/v bias and gammas come back too
    assert torch.count_nonzero(m.rel_pos_bias.relative_position_bias_table) == 0
    assert torch.all(m.blocks[0].gamma_1 == 0.1) and torch.count_nonzero(m.blocks[0].attn.q_bias) == 0
    assert m.lm_head.weight.abs().max() <= STD * (1 + 1e-6)
    assert m.blocks[1].attn.proj.weight.abs().max() <= STD / 2 * (1 + 1e-6)


def _ragged_mask(B=3, N=16):
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True  # 3
    # image 1: nothing masked
    mask[2, 4:13] = True  # 9
    return mask


def test_forward_shapes_with_ragged_mask():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(3, 3, 64, 64)
    mask = _ragged_mask()
    features, masked_logits = m(x, mask)
    assert features.shape == (3, 16, 192)
    assert masked_logits.shape == (12, 8192)
    assert torch.allclose(masked_logits, m.lm_head(features)[mask], atol=1e-6)
    # row order = bool_masked_pos.nonzero()
    rows = mask.nonzero()
    assert torch.allclose(masked_logits[4], m.lm_head(features[rows[4, 0], rows[4, 1]]), atol=1e-6)
    # features: after the final norm, CLS dropped
    full = m.forward_features(x, mask)
    assert full.shape == (3, 17, 192) and torch.equal(full[:, 1:], features)
    # a (B,h,w) mask is the same thing
    f2, l2 = m(x, mask.view(3, 4, 4))
    assert torch.equal(f2, features) and torch.equal(l2, masked_logits)
    with pytest.raises(ValueError, match='patches'):
        m(x, torch.zeros(3, 15, dtype=torch.bool))


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(3, 3, 64, 64)
    mask = _ragged_mask()
    with torch.no_grad():
        f_masked, _ = m(x, mask)
        f_plain, _ = m(x, torch.zeros_like(mask))
        # masked positions see the mask token instead of their patch
        assert not torch.allclose(f_masked[mask], f_plain[mask])
        # the content of a masked patch no longer matters at all
        x2 = x.clone()
        x2[2, :, 16:32, 0:64] = 7.0  # patches 4..7 of image 2, all masked
        f_masked2, _ = m(x2, mask)
        assert torch.equal(f_masked2, f_masked)
        f_plain2, _ = m(x2, torch.zeros_like(mask))
        assert not torch.allclose(f_plain2[2], f_plain[2])
        # and the mask token's value does
        m.mask_token.add_(1.0)
        f_masked3, _ = m(x, mask)
        assert not torch.allclose(f_masked3[mask], f_masked[mask])
        assert torch.equal(f_masked3[1], f_masked[1])  # image 1 has no masked patch


def test_gradient_reaches_mask_token_and_grad_checkpointing_matches():
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.0).train()
    x = torch.randn(3, 3, 64, 64)
    mask = _ragged_mask()

    def run():
        m.zero_grad(set_to_none=True)
        feats, logits = m(x, mask)
        (logits.logsumexp(-1).sum() + feats.pow(2).mean()).backward()
        return feats.detach(), logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    f1, l1, g1 = run()
    assert g1['mask_token'].abs().sum() > 0
    assert g1['lm_head.weight'].abs().sum() > 0 and g1['cls_token'].abs().sum() > 0
    m.set_grad_checkpointing(True)
    f2, l2, g2 = run()
    assert torch.allclose(f1, f2, atol=1e-6) and torch.allclose(l1, l2, atol=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-4), n


def test_classification_sizes_are_plain_timm_beit():
    for name, (dim, heads) in {'beit_tiny_patch16_224': (192, 3), 'beit_small_patch16_224': (384, 6)}.items():
        model = timm.create_model(name, num_classes=10, depth=1)
        assert type(model) is Beit
        assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
        assert model.head.out_features == 10
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    # timm's own names are untouched
    assert type(timm.create_model('beit_base_patch16_224', depth=1)) is Beit
    from timm.models import get_arch_name, is_model
    from timm.models._registry import _model_entrypoints
    assert is_model('beit_base_patch16_224')
    assert _model_entrypoints['beit_base_patch16_224'].__module__ == 'timm.models.beit'
    assert get_arch_name('beit_tiny_patch16_224') == 'beit_tiny_patch16_224'
