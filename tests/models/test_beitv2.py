"""BeitV2ForMaskedImageModeling (BEiT v2 patch aggregation): registry, unilm's state-dict keys, the
original's initialisation (cls_pt_layers keep PyTorch's default init), the forward step by step."""
import math

import pytest
import timm
import torch

import mcbeit.models  # noqa: F401  (registers the names)
from mcbeit.models.beit import BeitV2ForMaskedImageModeling
from mcbeit.models.recompute import RECOMPUTE_MODES, set_recompute

pytestmark = pytest.mark.usefixtures("one_thread")

V2_NAMES = {  # name: (dim, depth, heads, early_layers)
    'beit_tiny_patch16_224_8k_vocab_cls_pt': (192, 12, 3, 9),
    'beit_small_patch16_224_8k_vocab_cls_pt': (384, 12, 6, 9),
    'beit_base_patch16_224_8k_vocab_cls_pt': (768, 12, 12, 9),
    'beit_large_patch16_224_8k_vocab_cls_pt': (1024, 24, 16, 21),
}
STD = 0.02


def _block_keys(prefix: str) -> dict:
    D = 768
    return {f'{prefix}.gamma_1': (D,), f'{prefix}.gamma_2': (D,),
            f'{prefix}.norm1.weight': (D,), f'{prefix}.norm1.bias': (D,),
            f'{prefix}.attn.q_bias': (D,), f'{prefix}.attn.v_bias': (D,),
            f'{prefix}.attn.qkv.weight': (3 * D, D),
            f'{prefix}.attn.proj.weight': (D, D), f'{prefix}.attn.proj.bias': (D,),
            f'{prefix}.norm2.weight': (D,), f'{prefix}.norm2.bias': (D,),
            f'{prefix}.mlp.fc1.weight': (4 * D, D), f'{prefix}.mlp.fc1.bias': (4 * D,),
            f'{prefix}.mlp.fc2.weight': (D, 4 * D), f'{prefix}.mlp.fc2.bias': (D,)}


# unilm's beitv2_base_patch16_224_pt1k{,_300e}.pth 'model' (reference notes section 2): 220 keys
UNILM_BASE_KEYS = {
    'cls_token': (1, 1, 768), 'mask_token': (1, 1, 768),
    'patch_embed.proj.weight': (768, 3, 16, 16), 'patch_embed.proj.bias': (768,),
    'rel_pos_bias.relative_position_bias_table': (732, 12), 'rel_pos_bias.relative_position_index': (197, 197),
    **{k: v for i in range(12) for k, v in _block_keys(f'blocks.{i}').items()},
    'norm.weight': (768,), 'norm.bias': (768,),
    'lm_head.weight': (8192, 768), 'lm_head.bias': (8192,),
    **{k: v for i in range(2) for k, v in _block_keys(f'cls_pt_layers.{i}').items()},
}


@pytest.fixture(scope='module')
def base():
    torch.manual_seed(0)
    return timm.create_model('beit_base_patch16_224_8k_vocab_cls_pt')


def tiny(**kw):
    kw.setdefault('img_size', 64)  # 16 patches
    kw.setdefault('depth', 4)
    kw.setdefault('early_layers', 3)
    kw.setdefault('vocab_size', 64)
    return timm.create_model('beit_tiny_patch16_224_8k_vocab_cls_pt', **kw)


def test_unilm_state_dict_keys_and_shapes(base):
    assert len(UNILM_BASE_KEYS) == 220
    sd = base.state_dict()
    # unilm saves the shared table's index (a persistent buffer there, non-persistent in timm)
    sd['rel_pos_bias.relative_position_index'] = base.rel_pos_bias.relative_position_index
    assert {k: tuple(v.shape) for k, v in sd.items()} == UNILM_BASE_KEYS
    # and a unilm file loads strictly once that buffer is dropped
    base.load_state_dict({k: v for k, v in sd.items() if not k.endswith('relative_position_index')}, strict=True)


@pytest.mark.parametrize('name', sorted(V2_NAMES))
def test_registered_names(name):
    dim, depth, heads, early = V2_NAMES[name]
    model = timm.create_model(name, depth=depth, img_size=32)  # full depth (early_layers must fit), 2x2 patches
    assert type(model) is BeitV2ForMaskedImageModeling
    assert (model.embed_dim, len(model.blocks), model.early_layers, model.head_layers) == (dim, depth, early, 2)
    assert model.shared_lm_head and not hasattr(model, 'cls_pt_lm_head')
    assert len(model.cls_pt_layers) == 2 and model.cls_pt_layers[0].attn.num_heads == heads
    assert model.cls_pt_layers[0].attn.relative_position_bias_table is None  # they use the shared bias
    assert torch.all(model.cls_pt_layers[1].gamma_2 == 0.1) and model.cls_pt_layers[0].norm1.eps == 1e-6
    assert model.pos_embed is None and model.rel_pos_bias is not None and model.pretrained_cfg['url'] == ''


def test_drop_path_rates_of_the_aggregation_blocks():
    m = tiny(drop_path_rate=0.1)  # depth 4, early 3, head 2: linspace(0, 0.1, 5)[3], [4]
    assert [b.drop_path1.drop_prob for b in m.cls_pt_layers] == pytest.approx([0.075, 0.1])
    assert [getattr(b.drop_path1, 'drop_prob', 0.0) for b in m.blocks] == pytest.approx([0, 0.1 / 3, 0.2 / 3, 0.1])
    m = tiny(drop_path_rate=0.1, depth=6, early_layers=2)  # linspace(0, 0.1, 6)[2], [3]
    assert [b.drop_path1.drop_prob for b in m.cls_pt_layers] == pytest.approx([0.04, 0.06])


def _check_original_init(m: BeitV2ForMaskedImageModeling) -> None:
    """blocks: truncated normal cut at +-0.02, then / sqrt(2 (i+1)); cls_pt_layers: PyTorch's default Linear
    init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, then proj/fc2 / sqrt(2 (early+i+1))."""
    for i, blk in enumerate(m.blocks):
        assert blk.attn.qkv.weight.abs().max() <= STD * (1 + 1e-6)
        assert blk.attn.proj.weight.abs().max() <= STD / math.sqrt(2 * (i + 1)) * (1 + 1e-6)
        assert torch.count_nonzero(blk.mlp.fc1.bias) == 0
    for i, blk in enumerate(m.cls_pt_layers):
        rescale = math.sqrt(2 * (m.early_layers + i + 1))
        for lin, scale in ((blk.attn.qkv, 1), (blk.mlp.fc1, 1), (blk.attn.proj, rescale), (blk.mlp.fc2, rescale)):
            bound = 1 / math.sqrt(lin.in_features)
            w = lin.weight.detach() * scale
            assert w.abs().max() <= bound * (1 + 1e-6) and w.abs().max() > 0.95 * bound  # uniform, to the bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            if lin.bias is not None:  # biases: uniform too, not zero; never rescaled
                assert 0 < lin.bias.abs().max() <= bound * (1 + 1e-6)
        assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.all(blk.gamma_1 == 0.1)
        assert torch.all(blk.norm1.weight == 1) and torch.count_nonzero(blk.norm2.bias) == 0


def test_original_initialisation(base):
    _check_original_init(base)
    assert base.lm_head.weight.abs().max() <= STD * (1 + 1e-6)


def test_init_weights_reset_redoes_the_original_init_and_the_non_shared_head():
    torch.manual_seed(0)
    m = tiny(img_size=32, embed_dim=384, num_heads=6, shared_lm_head=False)
    assert m.cls_pt_lm_head.weight.abs().max() <= STD * (1 + 1e-6) and torch.count_nonzero(m.cls_pt_lm_head.bias) == 0
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)
    m.init_weights()
    _check_original_init(m)
    assert m.cls_pt_lm_head.weight.abs().max() <= STD * (1 + 1e-6) and torch.count_nonzero(m.cls_pt_lm_head.bias) == 0
    assert torch.all(m.cls_pt_norm.weight == 1) and torch.count_nonzero(m.cls_pt_norm.bias) == 0


def _literal_forward(m, x, mask):
    """unilm's VisionTransformerForMaskedImageModelingCLS.forward, step by step, with the model's own modules."""
    B = x.shape[0]
    t = m.patch_embed(x)
    w = mask.unsqueeze(-1).type_as(t)
    t = t * (1 - w) + m.mask_token.expand(B, t.shape[1], -1) * w
    t = torch.cat([m.cls_token.expand(B, -1, -1), t], dim=1)
    bias = m.rel_pos_bias()
    early_states = None
    for i, blk in enumerate(m.blocks):
        t = blk(t, shared_rel_pos_bias=bias)
        if i + 1 == m.early_layers:
            early_states = t[:, 1:]
    t_cls_pt = torch.cat([t[:, [0]], early_states], dim=1)
    for blk in m.cls_pt_layers:
        t_cls_pt = blk(t_cls_pt, shared_rel_pos_bias=bias)
    main = m.norm(t)[:, 1:]
    if m.shared_lm_head:
        return main, m.lm_head(main[mask]), m.lm_head(m.norm(t_cls_pt)[:, 1:][mask])
    return main, m.lm_head(main[mask]), m.cls_pt_lm_head(m.cls_pt_norm(t_cls_pt)[:, 1:][mask])


@pytest.mark.parametrize('shared', [True, False])
def test_forward_is_the_originals_patch_aggregation(shared):
    torch.manual_seed(0)
    m = tiny(shared_lm_head=shared).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 64, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.4
    mask[1] = False  # an image without masked patches
    with torch.no_grad():
        got = m(x, mask)
        want = _literal_forward(m, x, mask)
    assert [tuple(t.shape) for t in got] == [(3, 16, 192), (int(mask.sum()), 64), (int(mask.sum()), 64)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # forward_features stays the main stream (what k-NN and export read); the two heads' logits differ
    assert torch.equal(m.forward_features(x, mask)[:, 1:], got[0])
    assert not torch.allclose(got[1], got[2])


def test_every_recompute_mode_gives_the_same_gradients():
    def grads(mode):
        torch.manual_seed(0)
        m = set_recompute(tiny(drop_path_rate=0.1).train(), mode)
        g = torch.Generator().manual_seed(1)
        x, mask = torch.randn(2, 3, 64, 64, generator=g), torch.rand(2, 16, generator=g) < 0.5
        torch.manual_seed(3)  # the drop-path draws
        _, a, b = m(x, mask)
        (a.logsumexp(-1).mean() + b.logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads('none')
    assert ref['cls_pt_layers.1.mlp.fc2.weight'].abs().sum() > 0 and ref['mask_token'].abs().sum() > 0
    for mode in RECOMPUTE_MODES:
        got = grads(mode)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-4, msg=f'{mode}: {n}')


def test_bad_aggregation_arguments_are_refused():
    with pytest.raises(ValueError, match='blocks 1..4'):
        tiny(early_layers=5)
    with pytest.raises(ValueError, match='blocks 1..4'):
        tiny(early_layers=0)
    with pytest.raises(ValueError, match='head_layers'):
        tiny(head_layers=-1)
