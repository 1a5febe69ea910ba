"""Released BEiT v2 files, each written here in its released layout and loaded: unilm's pre-training file,
timm's beitv2 fine-tuned weights, mmpretrain's pre-training and fine-tuned files (through the key map of
mcbeit.models.key_maps, checked first on names)."""
import re

import pytest
import torch
from timm.models.beit import gen_relative_position_index

from mcbeit.models.key_maps import (PREPROCESSOR_DROPPED, RENAMED, TOKENIZER_DROPPED, UnmappedKeysError,
                                    from_mmpretrain, is_mmpretrain, mmpretrain_vit_key, split_notes)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- released layouts, written literally
def _block(prefix, dim, g, heads=None):
    """One unilm / timm Block's keys (layer scale, q/v bias) with random values."""
    sd = {f'{prefix}.gamma_1': torch.randn(dim), f'{prefix}.gamma_2': torch.randn(dim)}
    for n in ('norm1', 'norm2'):
        sd[f'{prefix}.{n}.weight'], sd[f'{prefix}.{n}.bias'] = torch.randn(dim), torch.randn(dim)
    sd[f'{prefix}.attn.q_bias'], sd[f'{prefix}.attn.v_bias'] = torch.randn(dim), torch.randn(dim)
    sd[f'{prefix}.attn.qkv.weight'] = torch.randn(3 * dim, dim) * 0.05
    sd[f'{prefix}.attn.proj.weight'], sd[f'{prefix}.attn.proj.bias'] = torch.randn(dim, dim) * 0.05, torch.randn(dim)
    if heads is not None:  # fine-tuned files: a table (and its index) per block
        sd[f'{prefix}.attn.relative_position_bias_table'] = torch.randn((2 * g - 1) ** 2 + 3, heads)
        sd[f'{prefix}.attn.relative_position_index'] = gen_relative_position_index((g, g))
    sd[f'{prefix}.mlp.fc1.weight'], sd[f'{prefix}.mlp.fc1.bias'] = torch.randn(4 * dim, dim) * 0.05, torch.randn(4 * dim)
    sd[f'{prefix}.mlp.fc2.weight'], sd[f'{prefix}.mlp.fc2.bias'] = torch.randn(dim, 4 * dim) * 0.05, torch.randn(dim)
    return sd


def unilm_v2_pretraining_sd(dim=192, depth=12, heads=3, vocab=64, g=14, head_layers=2, seed=0):
    """The keys of beitv2_base_patch16_224_pt1k.pth (the reference's literal list) at any width: cls/mask token,
    patch_embed.proj, the shared rel_pos_bias table + index, blocks.N.* with gamma_1/2, norm, lm_head, cls_pt_layers."""
    torch.manual_seed(seed)
    rows = (2 * g - 1) ** 2 + 3
    sd = {'cls_token': torch.randn(1, 1, dim), 'mask_token': torch.randn(1, 1, dim),
          'patch_embed.proj.weight': torch.randn(dim, 3, 16, 16) * 0.02, 'patch_embed.proj.bias': torch.randn(dim),
          'rel_pos_bias.relative_position_bias_table': torch.randn(rows, heads),
          'rel_pos_bias.relative_position_index': gen_relative_position_index((g, g))}
    for i in range(depth):
        sd.update(_block(f'blocks.{i}', dim, g))
    sd.update({'norm.weight': torch.randn(dim), 'norm.bias': torch.randn(dim),
               'lm_head.weight': torch.randn(vocab, dim) * 0.05, 'lm_head.bias': torch.randn(vocab)})
    for i in range(head_layers):
        sd.update(_block(f'cls_pt_layers.{i}', dim, g))
    return sd


# mmpretrain's names, written from its module definitions (backbones/beit.py BEiTTransformerEncoderLayer: ln1, attn,
# ln2, ffn = mmcv FFN(layers = [Sequential(Linear, act, Dropout), Linear, Dropout]), gamma_1/2; mmcv PatchEmbed
# .projection; necks/beitv2_neck.py patch_aggregation + norm; heads/beitv2_head.py cls_head; LinearClsHead fc).
_MM_LAYER = (('.norm1.', '.ln1.'), ('.norm2.', '.ln2.'), ('.mlp.fc1.', '.ffn.layers.0.0.'), ('.mlp.fc2.', '.ffn.layers.1.'))


def to_mmpretrain(sd, final_norm='neck.norm'):
    """A unilm-named BEiT v2 state dict in mmpretrain's names (the test's own inverse of the map)."""
    out = {}
    for k, v in sd.items():
        new = k
        m = re.match(r'^(blocks|cls_pt_layers)\.(\d+)(\..+)$', k)
        if m:
            rest = m.group(3)
            for a, b in _MM_LAYER:
                rest = rest.replace(a, b)
            where = 'backbone.layers' if m.group(1) == 'blocks' else 'neck.patch_aggregation'
            new = f'{where}.{m.group(2)}{rest}'
        elif k.startswith('patch_embed.proj.'):
            new = 'backbone.patch_embed.projection.' + k[len('patch_embed.proj.'):]
        elif k.startswith('norm.'):
            new = f'{final_norm}.' + k[len('norm.'):]
        elif k.startswith('fc_norm.'):
            new = 'backbone.ln2.' + k[len('fc_norm.'):]
        elif k.startswith('lm_head.'):
            new = 'head.cls_head.' + k[len('lm_head.'):]
        elif k.startswith('head.'):
            new = 'head.fc.' + k[len('head.'):]
        else:
            new = 'backbone.' + k
        out[new] = v
    return out


def mmpretrain_vqkd_sd(dim=192, depth=2, g=14, seed=1):
    """mmpretrain's VQKD (selfsup/beit.py): encoder = BEiTViT(final_norm=True, out_type='featmap', abs pos, no layer
    scale) -> encoder.ln1; quantize = NormEMAVectorQuantizer (embedding.weight, embedding.initted, cluster_size);
    encode_task_layer = Sequential(Linear, Tanh, Linear)."""
    torch.manual_seed(seed)
    sd = {'encoder.cls_token': torch.randn(1, 1, dim), 'encoder.pos_embed': torch.randn(1, g * g + 1, dim),
          'encoder.patch_embed.projection.weight': torch.randn(dim, 3, 16, 16),
          'encoder.patch_embed.projection.bias': torch.randn(dim),
          'encoder.ln1.weight': torch.randn(dim), 'encoder.ln1.bias': torch.randn(dim),
          'quantize.embedding.weight': torch.randn(64, 32), 'quantize.embedding.initted': torch.ones(1),
          'quantize.cluster_size': torch.zeros(64),
          'encode_task_layer.0.weight': torch.randn(dim, dim), 'encode_task_layer.0.bias': torch.randn(dim),
          'encode_task_layer.2.weight': torch.randn(32, dim), 'encode_task_layer.2.bias': torch.randn(32)}
    for i in range(depth):  # layer_scale_init_value=0: no gamma
        blk = {k: v for k, v in _block(f'blocks.{i}', dim, g).items() if 'gamma' not in k}
        sd.update({'encoder.' + k[len('backbone.'):]: v for k, v in to_mmpretrain(blk).items()})
    return sd


# ---------------------------------------------------------------------- 1. the key map, on names
def test_vit_key_map_follows_mmpretrains_modules():
    table = {
        'layers.3.ln1.weight': 'blocks.3.norm1.weight', 'layers.3.ln2.bias': 'blocks.3.norm2.bias',
        'layers.0.ffn.layers.0.0.weight': 'blocks.0.mlp.fc1.weight', 'layers.0.ffn.layers.0.0.bias': 'blocks.0.mlp.fc1.bias',
        'layers.11.ffn.layers.1.weight': 'blocks.11.mlp.fc2.weight', 'layers.1.gamma_1': 'blocks.1.gamma_1',
        'layers.1.gamma_2': 'blocks.1.gamma_2', 'layers.2.attn.qkv.weight': 'blocks.2.attn.qkv.weight',
        'layers.2.attn.q_bias': 'blocks.2.attn.q_bias', 'layers.2.attn.v_bias': 'blocks.2.attn.v_bias',
        'layers.2.attn.proj.bias': 'blocks.2.attn.proj.bias',
        'layers.2.attn.relative_position_bias_table': 'blocks.2.attn.relative_position_bias_table',
        'layers.2.attn.relative_position_index': 'blocks.2.attn.relative_position_index',
        'patch_embed.projection.weight': 'patch_embed.proj.weight', 'cls_token': 'cls_token',
        'mask_token': 'mask_token', 'pos_embed': 'pos_embed',
        'rel_pos_bias.relative_position_bias_table': 'rel_pos_bias.relative_position_bias_table',
        'rel_pos_bias.relative_position_index': 'rel_pos_bias.relative_position_index',
        'ln1.weight': 'norm.weight', 'ln2.bias': 'fc_norm.bias'}
    assert {k: mmpretrain_vit_key(k) for k in table} == table
    assert mmpretrain_vit_key('ln1.weight', final_norm='fc_norm') == 'fc_norm.weight'  # a VQ-KD encoder's
    for bad in ('layers.0.ffn.layers.2.weight', 'layers.0.attn.k_bias', 'patch_embed.norm.weight', 'ln3.weight',
                'layers.0.ln1.running_mean'):
        with pytest.raises(UnmappedKeysError, match=re.escape(bad)):
            mmpretrain_vit_key(bad)


def test_mmpretrain_v2_pretraining_names_map_to_unilms_exactly():
    unilm = unilm_v2_pretraining_sd(depth=2, g=4)
    mm = to_mmpretrain(unilm)
    mm['target_generator.encoder.layers.0.ln1.weight'] = torch.ones(192)
    mm['target_generator.quantize.embedding.weight'] = torch.ones(64, 32)
    mm['data_preprocessor.second_mean'] = torch.ones(3)
    assert 'neck.patch_aggregation.1.ffn.layers.1.weight' in mm and 'head.cls_head.weight' in mm
    assert is_mmpretrain(mm) and is_mmpretrain({'meta': {'epoch': 3}, 'state_dict': mm})
    assert not is_mmpretrain(unilm) and not is_mmpretrain({'model': unilm})
    assert not is_mmpretrain({'backbone.blocks.0.norm1.weight': torch.ones(1)})  # our linear probe's names

    for given in (mm, {'meta': {'epoch': 300}, 'state_dict': mm}):
        out, notes = from_mmpretrain(given)
        assert out.keys() == unilm.keys()
        assert all(out[k] is unilm[k] for k in unilm)  # tensors unchanged, nothing copied
        renamed, dropped = split_notes(notes)
        assert set(notes) == set(mm)  # every key accounted for
        assert dropped == {'target_generator.encoder.layers.0.ln1.weight': TOKENIZER_DROPPED,
                           'target_generator.quantize.embedding.weight': TOKENIZER_DROPPED,
                           'data_preprocessor.second_mean': PREPROCESSOR_DROPPED}
        assert renamed['neck.norm.weight'] == 'norm.weight' and notes['head.cls_head.bias'] == RENAMED + 'lm_head.bias'


def test_mmpretrain_classifier_and_tokenizer_names():
    cls = {'backbone.ln2.weight': torch.ones(8), 'backbone.layers.0.attn.relative_position_bias_table': torch.ones(2, 3),
           'head.fc.weight': torch.ones(5, 8), 'head.fc.bias': torch.ones(5)}
    out, _ = from_mmpretrain(cls)
    assert set(out) == {'fc_norm.weight', 'blocks.0.attn.relative_position_bias_table', 'head.weight', 'head.bias'}

    vqkd = mmpretrain_vqkd_sd()
    assert is_mmpretrain(vqkd)
    out, notes = from_mmpretrain(vqkd, tokenizer=True)
    assert {'encoder.fc_norm.weight', 'encoder.blocks.1.mlp.fc2.weight', 'encoder.patch_embed.proj.weight',
            'encoder.pos_embed', 'quantize.embedding.weight', 'encode_task_layer.2.bias'} <= set(out)
    assert not any('ln1' in k or 'ffn' in k or 'projection' in k or 'gamma' in k for k in out)
    assert len(out) == len(vqkd) and all(v.startswith(RENAMED) for v in notes.values())
    # the tokenizer inside a whole pre-training file: the model's keys are noted, not loaded
    whole = {**to_mmpretrain(unilm_v2_pretraining_sd(depth=1, g=4, head_layers=1)),
             **{'target_generator.' + k: v for k, v in vqkd.items()}}
    tok, notes = from_mmpretrain({'meta': {}, 'state_dict': whole}, tokenizer=True)
    assert tok.keys() == out.keys() and notes['backbone.cls_token'].startswith('the pre-training model')


def test_unknown_mmpretrain_keys_are_an_error_naming_them():
    mm = to_mmpretrain(unilm_v2_pretraining_sd(depth=1, g=4, head_layers=1))
    mm['neck.extra_proj.weight'] = torch.ones(3)
    mm['backbone.layers.0.ffn.gamma2.weight'] = torch.ones(3)
    with pytest.raises(UnmappedKeysError) as err:
        from_mmpretrain(mm)
    assert err.value.keys == ['neck.extra_proj.weight', 'backbone.layers.0.ffn.gamma2.weight']
    assert 'neck.extra_proj.weight' in str(err.value) and 'backbone.layers.0.ffn.gamma2.weight' in str(err.value)
