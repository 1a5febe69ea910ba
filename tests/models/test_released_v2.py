"""Released BEiT v2 files, each written here in its released layout and loaded: unilm's pre-training file,
timm's beitv2 fine-tuned weights, mmpretrain's pre-training and fine-tuned files (through the key map of
mcbeit.models.key_maps, checked first on names)."""
import argparse
import logging
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.beit import gen_relative_position_index

from mcbeit.cli import finetune
from mcbeit.engine.distributed import cleanup
from mcbeit.errors import InputError
from mcbeit.models.beit_weights import convert_state_dict, load_for_finetuning, load_pretrained
from mcbeit.models.checkpoint import filter_pretraining_state_dict, load_checkpoint_file, load_into, select_state_dict
from mcbeit.models.classifier import build_classifier
from tests.tasks.conftest import make_image_folder
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


# ---------------------------------------------------------------------- 2./3. files in the released layouts, loaded
TINY_CLS, TINY_V2 = 'beit_tiny_patch16_224', 'beit_tiny_patch16_224_8k_vocab_cls_pt'
PRETRAINING_DROPS = ('cls_pt_layers.', 'lm_head.', 'mask_token', 'norm.')


def write_unilm_v2_pretraining(path, **kw):
    """unilm's utils.save_model layout: {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}."""
    sd = unilm_v2_pretraining_sd(**kw)
    args = argparse.Namespace(model='beit_base_patch16_224_8k_vocab_cls_pt', early_layers=9, head_layers=2,
                              shared_lm_head=True, imagenet_default_mean_and_std=True, input_size=224)
    torch.save({'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                'scaler': {'scale': 65536.0}, 'args': args}, path)
    return sd


def write_mmpretrain_v2_pretraining(path, unilm):
    """mmpretrain's BEiT v2 file: {'meta', 'state_dict': backbone.*, neck.*, head.*, target_generator.*}."""
    sd = to_mmpretrain(unilm)
    sd.update({'target_generator.' + k: v for k, v in mmpretrain_vqkd_sd(depth=1).items()})
    meta = {'epoch': 300, 'iter': 187500, 'mmengine_version': '0.7.3', 'time': '20230201_120000',
            'dataset_meta': {}, 'seed': 0}
    torch.save({'meta': meta, 'state_dict': sd}, path)
    return sd


def v2_pretraining_model(**kw):
    return timm.create_model(TINY_V2, vocab_size=64, **kw).eval()


def tiny_classifier(nb_classes=10, **kw):
    return build_classifier(TINY_CLS, nb_classes=nb_classes, **kw).eval()


@pytest.fixture(scope='module')
def unilm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('unilm') / 'beitv2_tiny_patch16_224_pt1k.pth'
    return path, write_unilm_v2_pretraining(path)


@pytest.fixture(scope='module')
def mmpretrain_file(tmp_path_factory, unilm_file):
    path = tmp_path_factory.mktemp('mmpretrain') / 'beitv2_beit-tiny-p16_8xb256-amp-coslr-300e_in1k.pth'
    return path, write_mmpretrain_v2_pretraining(path, unilm_file[1])


def _check_finetuning_conversion(model, unilm, report):
    """The original's --finetune: shared table in every block, pre-training heads and norm dropped and listed."""
    own = model.state_dict()
    for i in range(12):
        assert torch.equal(own[f'blocks.{i}.attn.relative_position_bias_table'],
                           unilm['rel_pos_bias.relative_position_bias_table'])
        assert torch.equal(own[f'blocks.{i}.mlp.fc2.weight'], unilm[f'blocks.{i}.mlp.fc2.weight'])
        assert torch.equal(own[f'blocks.{i}.gamma_1'], unilm[f'blocks.{i}.gamma_1'])
    assert torch.equal(own['patch_embed.proj.weight'], unilm['patch_embed.proj.weight'])
    assert report.expanded_shared_rel_pos_bias and sorted(report.fresh) == [
        'fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    dropped = [k for k in report.dropped if k.startswith(PRETRAINING_DROPS)]
    assert sorted(dropped) == sorted(k for k in unilm if k.startswith(PRETRAINING_DROPS))  # 30 + 2 + 1 + 2
    assert 'rel_pos_bias.relative_position_index' in report.dropped
    summary = report.summary()
    # every dropped key is named: one by one when few, else by module with its count
    assert 'cls_pt_layers.* (30 keys)' in summary and 'lm_head.weight' in summary and 'mask_token' in summary
    assert 'norm.weight' in summary and 'shared relative position bias copied into every block' in summary


def test_unilm_v2_pretraining_file_finetunes_and_initialises_the_v2_model(unilm_file):
    path, unilm = unilm_file
    model = tiny_classifier()
    report = load_for_finetuning(str(path), model)
    _check_finetuning_conversion(model, unilm, report)
    assert report.model_key == 'model' and not report.renamed

    # the v2 pre-training model: strict loading after the filter (the resume / initialise route)
    v2 = v2_pretraining_model()
    load_into(v2, filter_pretraining_state_dict(load_checkpoint_file(path), v2), strict=True)
    own = v2.state_dict()
    assert all(torch.equal(own[k], v) for k, v in unilm.items() if k in own) and len(own) == len(unilm) - 1


def test_mmpretrain_v2_pretraining_file_loads_into_the_v2_model_and_finetunes(mmpretrain_file, unilm_file, caplog):
    path, mm = mmpretrain_file
    unilm = unilm_file[1]
    ckpt = load_checkpoint_file(path)
    renamed = {}
    sd, used, dropped = select_state_dict(ckpt, renamed=renamed)
    assert used == 'state_dict' and sd.keys() == unilm.keys() and len(renamed) == len(unilm)
    assert set(dropped) == {k for k in mm if k.startswith('target_generator.')}
    assert set(dropped.values()) == {TOKENIZER_DROPPED}

    v2 = v2_pretraining_model()  # the filter (PretrainTask.load_weights's route) takes the whole file
    with caplog.at_level(logging.INFO, logger='mcbeit.models.checkpoint'):
        load_into(v2, filter_pretraining_state_dict(ckpt, v2), strict=True)
    assert 'target_generator.quantize.embedding.weight' in caplog.text
    assert all(torch.equal(v2.state_dict()[k], unilm[k]) for k in v2.state_dict())
    v2b = v2_pretraining_model()
    report = load_pretrained(v2b, path)  # the Python route: keeps the heads, lists the tokenizer
    assert report.renamed['neck.patch_aggregation.1.ffn.layers.0.0.weight'] == 'cls_pt_layers.1.mlp.fc1.weight'
    assert report.renamed['head.cls_head.weight'] == 'lm_head.weight' and not report.fresh
    assert 'target_generator.encoder.ln1.weight' in report.dropped and 'mmpretrain names mapped' in report.summary()
    assert all(torch.equal(v, v2.state_dict()[k]) for k, v in v2b.state_dict().items())

    model = tiny_classifier()
    report = load_for_finetuning(str(path), model)
    _check_finetuning_conversion(model, unilm, report)
    from_unilm = tiny_classifier()
    load_for_finetuning(str(unilm_file[0]), from_unilm)
    # mmpretrain's own fine-tuning config loads with prefix='backbone.': the same tensors but the fresh head
    by_prefix = tiny_classifier()
    report = load_for_finetuning(str(path), by_prefix, model_prefix='backbone.')
    assert report.dropped['neck.norm.weight'] == "outside --model_prefix 'backbone.'"
    for other in (from_unilm, by_prefix):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items()
                   if not k.startswith(('head.', 'fc_norm.')))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """IMNET layout, 4 classes of 64 px images: 8 train, 4 val."""
    root = tmp_path_factory.mktemp('images')
    make_image_folder(root / 'train', n_per_class=2, size=64, seed=1)
    make_image_folder(root / 'val', n_per_class=1, size=64, seed=2)
    return root


def test_v2_pretraining_files_finetune_through_the_command_line(unilm_file, mmpretrain_file, images, tmp_path,
                                                               capfd):
    """mcbeit-finetune --finetune FILE for both pre-training layouts: one epoch each, from the file's weights
    (without --imagenet_default_mean_and_std, which the original's v2 command passes, a warning says so)."""
    unilm = unilm_file[1]
    for name, (path, _), norm in (('unilm', unilm_file, ['--imagenet_default_mean_and_std']),
                                  ('mmpretrain', mmpretrain_file, [])):
        out = tmp_path / name
        assert finetune.main(['--data_path', str(images), '--output_dir', str(out), '--finetune', str(path),
                              '--model', TINY_CLS, '--input_size', '64', '--batch_size', '8', '--num_workers', '0',
                              '--device', 'cpu', '--epochs', '1', '--aa', '', '--reprob', '0', '--warmup_epochs', '0',
                              '--lr', '1e-4', *norm]) == 0
        cleanup()
        logged = capfd.readouterr().err  # the run's log: what --finetune dropped, and the v2 normalisation warning
        assert 'cls_pt_layers.* (30 keys)' in logged and 'lm_head.weight' in logged
        assert ('is a BEiT v2 pre-training checkpoint' in logged) == (not norm)
        ckpt = torch.load(out / 'checkpoint-0.pth', weights_only=True)['model']
        moved = (ckpt['blocks.3.mlp.fc1.weight'] - unilm['blocks.3.mlp.fc1.weight']).abs()
        assert 0 < moved.max() < 0.01  # started from the file's weights, trained one step
        assert ckpt['blocks.5.attn.relative_position_bias_table'].shape == (7 * 7 + 3, 3)  # 4x4 grid at 64 px


def test_beitv2_models_are_normalised_with_imagenet_mean_and_std():
    parse = finetune.get_args_parser().parse_args
    for model, expected in (('beitv2_base_patch16_224', True), ('beit_base_patch16_224', False)):
        config = finetune.resolve_defaults(parse(['--model', model, '--data_path', 'd']))
        assert config.imagenet_default_mean_and_std is expected
    assert finetune.resolve_defaults(parse(['--model', 'beit_base_patch16_224', '--data_path', 'd',
                                            '--imagenet_default_mean_and_std'])).imagenet_default_mean_and_std
    with pytest.raises(InputError, match='classification counterpart beit_base_patch16_224'):
        build_classifier('beit_base_patch16_224_8k_vocab_cls_pt', nb_classes=10)


# ---------------------------------------------------------------------- base size: the released names and shapes
BASE_SHAPES = {'cls_token': (1, 1, 768), 'mask_token': (1, 1, 768), 'patch_embed.proj.weight': (768, 3, 16, 16),
               'rel_pos_bias.relative_position_bias_table': (732, 12),
               'rel_pos_bias.relative_position_index': (197, 197), 'blocks.11.gamma_2': (768,),
               'blocks.0.attn.q_bias': (768,), 'blocks.0.attn.qkv.weight': (2304, 768),
               'blocks.5.mlp.fc1.weight': (3072, 768), 'blocks.5.mlp.fc2.weight': (768, 3072),
               'norm.weight': (768,), 'lm_head.weight': (8192, 768), 'lm_head.bias': (8192,),
               'cls_pt_layers.1.attn.proj.weight': (768, 768), 'cls_pt_layers.0.gamma_1': (768,)}


def test_base_v2_pretraining_keys_load_into_the_base_models():
    """beitv2_base_patch16_224_pt1k.pth's 220 keys (the reference's list) at their shapes: strict into
    beit_base_patch16_224_8k_vocab_cls_pt after the filter, and --finetune's conversion into beit_base_patch16_224."""
    ckpt = {'model': unilm_v2_pretraining_sd(dim=768, depth=12, heads=12, vocab=8192, g=14), 'epoch': 1599,
            'args': argparse.Namespace()}
    sd = ckpt['model']
    assert len(sd) == 220 and {k: tuple(sd[k].shape) for k in BASE_SHAPES} == BASE_SHAPES
    assert not any('pos_embed' in k or k.endswith('attn.relative_position_bias_table') for k in sd)

    v2 = timm.create_model('beit_base_patch16_224_8k_vocab_cls_pt')
    load_into(v2, filter_pretraining_state_dict(ckpt, v2), strict=True)
    del v2
    model = build_classifier('beit_base_patch16_224', nb_classes=1000)
    converted, report = convert_state_dict(ckpt, model)
    model.load_state_dict(converted)
    assert report.loaded == 220 - 35 - 1 + 11 and report.expanded_shared_rel_pos_bias  # +11: the table in 12 blocks
    assert torch.equal(model.blocks[7].attn.relative_position_bias_table, sd['rel_pos_bias.relative_position_bias_table'])


@pytest.fixture(scope='module')
def timm_beitv2(tmp_path_factory):
    """timm's beitv2_base_patch16_224 (the .in1k_ft_* fine-tuned weights' layout) with random weights, saved as
    the hub's model.safetensors (a flat state dict)."""
    torch.manual_seed(3)
    model = timm.create_model('beitv2_base_patch16_224', pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp('timm') / 'model.safetensors'
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return path, model, sd


def test_timm_beitv2_weights_evaluate_and_finetune_further(timm_beitv2):
    path, _, sd = timm_beitv2
    model = build_classifier('beitv2_base_patch16_224', nb_classes=1000)
    report = load_for_finetuning(str(path), model)
    assert not report.dropped and not report.fresh and not report.expanded_shared_rel_pos_bias
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    model = build_classifier('beitv2_base_patch16_224', nb_classes=10)  # further fine-tuning: another class count
    report = load_for_finetuning(str(path), model)
    assert sorted(report.dropped) == ['head.bias', 'head.weight'] and sorted(report.fresh) == ['head.bias', 'head.weight']
    assert 'starts fresh' in report.dropped['head.weight'] and model.head.weight.shape == (10, 768)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if not k.startswith('head.'))

    # unilm's own fine-tuned v2 files: 'module' (not stripped) and an index buffer per block, into beit_base
    unilm = {'module': {**sd, **{f'blocks.{i}.attn.relative_position_index': gen_relative_position_index((14, 14))
                                 for i in range(12)}}}
    model = build_classifier('beit_base_patch16_224', nb_classes=1000)
    converted, report = convert_state_dict(unilm, model)
    assert report.model_key == 'module' and len(report.dropped) == 12 and not report.fresh
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def test_mmpretrain_finetuned_classifier_evaluates_in_beit_base(timm_beitv2, tmp_path):
    """mmpretrain's beit-base-p16_beitv2-pre_8xb128-coslr-100e_in1k: backbone.layers.N (per-block tables and their
    persistent index), backbone.ln2 after mean pooling, head.fc; evaluated by beit_base_patch16_224."""
    _, reference, sd = timm_beitv2
    mm = to_mmpretrain({**sd, **{f'blocks.{i}.attn.relative_position_index': gen_relative_position_index((14, 14))
                                 for i in range(12)}})
    assert {'backbone.ln2.weight', 'head.fc.weight', 'backbone.layers.11.attn.relative_position_index',
            'backbone.layers.0.ffn.layers.0.0.weight'} <= set(mm) and not any(k.startswith('neck.') for k in mm)
    path = tmp_path / 'beit-base-p16_beitv2-pre_8xb128-coslr-100e_in1k.pth'
    torch.save({'meta': {'epoch': 100, 'dataset_meta': {'classes': ['c'] * 1000}}, 'state_dict': mm}, path)
    model = build_classifier('beit_base_patch16_224', nb_classes=1000).eval()
    report = load_for_finetuning(str(path), model)
    assert not report.fresh and set(report.dropped) == {f'blocks.{i}.attn.relative_position_index' for i in range(12)}
    assert report.renamed['backbone.ln2.bias'] == 'fc_norm.bias' and report.renamed['head.fc.weight'] == 'head.weight'
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_timm_beitv2_weights_evaluate_through_the_command_line(timm_beitv2, images, tmp_path):
    """The original's evaluation command (--finetune WEIGHTS --eval) with timm's name and file."""
    path = timm_beitv2[0]
    args = finetune.get_args_parser().parse_args([
        '--data_path', str(images), '--output_dir', str(tmp_path / 'eval'), '--model', 'beitv2_base_patch16_224',
        '--finetune', str(path), '--nb_classes', '1000', '--eval', '--input_size', '64', '--batch_size', '4',
        '--num_workers', '0', '--device', 'cpu'])
    assert finetune.resolve_defaults(args).imagenet_default_mean_and_std
    stats = finetune.run(args)
    cleanup()
    assert stats['test_images'] == 4 and 0 <= stats['test_acc1'] <= stats['test_acc5'] <= 100
