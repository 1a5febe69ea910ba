"""One conversion for BEiT-family weights: one file into one architecture gives equal tensors through every route
(--finetune, timm.create_model(..., pretrained=True) of this package's names, the Python loaders)."""
import argparse

import pytest
import timm
import torch

from mcbeit.models import checkpoint_filter_fn, load_for_export, load_pretrained
from mcbeit.models.beit_weights import load_for_finetuning
from mcbeit.models.checkpoint import StateDictMismatchError, read_checkpoint, resolve_source, select_state_dict
from mcbeit.models.classifier import classifier_kwargs
from mcbeit.models.position_resize import interpolate_rel_pos_table
from tests.models.test_finetune_checkpoint import randomized  # every tensor off its initial value

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, MIM = 'beit_tiny_patch16_224', 'beit_tiny_patch16_224_8k_vocab'
CLS_KW = classifier_kwargs(nb_classes=10)  # --finetune's defaults: mean pooling, a table per block
MIM_KW = dict(vocab_size=64)
TABLE = 'blocks.{}.attn.relative_position_bias_table'
SHARED = 'rel_pos_bias.relative_position_bias_table'


def pretraining_state(img_size, seed):
    mim = timm.create_model(MIM, img_size=img_size, **MIM_KW)
    sd = {k: v.clone() for k, v in randomized(mim, seed).state_dict().items()}
    index = {f'{n}': b.clone() for n, b in mim.named_buffers() if n.endswith('relative_position_index')}
    return sd, index


def write_mcbeit_pretraining(path):
    """This package's pre-training checkpoint: 224 px, shared table, lm_head and mask_token."""
    sd, _ = pretraining_state(224, 1)
    torch.save({'format': 'mcbeit-pretrain-v1', 'model': sd, 'optimizer': {}, 'epoch': 9,
                'args': {'model': MIM, 'input_size': 224}}, path)
    return path


def write_released(path):
    """A released-style pre-training file at 112 px (a 7x7 grid: 13*13+3 table rows) for 224 px models: the index
    buffers, an argparse.Namespace and BEiT v2's patch-aggregation layers beside the weights."""
    sd, index = pretraining_state(112, 2)
    sd.update(index, **{'cls_pt_layers.0.norm1.weight': torch.ones(192)})
    torch.save({'model': sd, 'epoch': 799, 'args': argparse.Namespace(model=MIM, input_size=112)}, path)
    return path


def write_deepspeed(folder):
    """DeepSpeed model states of a pre-training run: a checkpoint folder, 'module' + 'module.' prefixes."""
    sd, _ = pretraining_state(224, 3)
    (folder / 'global_step7').mkdir(parents=True)
    (folder / 'latest').write_text('global_step7\n')
    torch.save({'module': {'module.' + k: v for k, v in sd.items()}, 'buffer_names': [], 'global_steps': 7},
               folder / 'global_step7' / 'mp_rank_00_model_states.pt')
    return folder


WRITERS = {'mcbeit-pretraining': (write_mcbeit_pretraining, 'ckpt.pth'), 'released-112px': (write_released, 'rel.pth'),
           'deepspeed-folder': (write_deepspeed, 'ds')}


@pytest.fixture(scope='module', params=list(WRITERS))
def source(request, tmp_path_factory):
    write, name = WRITERS[request.param]
    return str(write(tmp_path_factory.mktemp(request.param) / name))


def build(name, **kwargs):
    torch.manual_seed(0)  # the keys the file lacks (head, fc_norm) keep this initialisation on every route
    return timm.create_model(name, **kwargs)


def routes(name, kwargs, path):
    """name -> model, one per route, each built from the same seed."""
    out = {
        'load_pretrained': build(name, **kwargs),
        'timm file': build(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs),
        '--finetune': build(name, **kwargs),
    }
    load_pretrained(out['load_pretrained'], path)
    load_for_finetuning(path, out['--finetune'])
    # timm reads nothing here: the registered names' pretrained_filter_fn converts the dict
    overlay = dict(state_dict=read_checkpoint(resolve_source(path)))
    out['timm state_dict'] = build(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return out


def assert_all_equal(models):
    (ref_name, ref), *others = models.items()
    ref_sd = ref.state_dict()
    for name, model in others:
        sd = model.state_dict()
        assert sd.keys() == ref_sd.keys(), name
        unequal = [k for k in sd if not torch.equal(sd[k], ref_sd[k])]
        assert not unequal, f'{name} vs {ref_name}: {unequal}'


def test_classifier_gets_the_same_tensors_through_every_route(source):
    models = routes(CLS, CLS_KW, source)
    assert_all_equal(models)
    ckpt_sd, _, _ = select_state_dict(read_checkpoint(resolve_source(source)))
    own = models['load_pretrained'].state_dict()
    shared = ckpt_sd[SHARED]
    resized = shared.shape != own[TABLE.format(0)].shape  # the released file's 7x7 grid
    expected = interpolate_rel_pos_table(shared, 732, (14, 14)) if resized else shared
    for i in range(12):  # the shared table in every block, resized with the original's spline
        assert torch.equal(own[TABLE.format(i)], expected)
    for k in ('cls_token', 'patch_embed.proj.weight', 'blocks.11.mlp.fc2.weight', 'blocks.3.gamma_2'):
        assert torch.equal(own[k], ckpt_sd[k]), k
    fresh = build(CLS, **CLS_KW).state_dict()
    for k in ('head.weight', 'head.bias', 'fc_norm.weight'):  # the file has none: the model's initialisation
        assert torch.equal(own[k], fresh[k]), k


def test_pretraining_model_gets_the_same_tensors_through_every_route(source):
    models = routes(MIM, MIM_KW, source)
    assert_all_equal(models)
    own = models['timm file'].state_dict()
    assert torch.equal(own['mask_token'], models['load_pretrained'].mask_token)
    assert own[SHARED].shape == (732, 3)


@pytest.mark.filterwarnings('ignore::UserWarning')  # timm's resize helper on today's torch
def test_released_table_is_resized_with_the_spline_not_timms_linear_resize(tmp_path):
    path = str(write_released(tmp_path / 'rel.pth'))
    model = build(CLS, pretrained=True, pretrained_cfg_overlay=dict(file=path), **CLS_KW)
    shared = read_checkpoint(path)['model'][SHARED]  # (13*13+3, 3)
    spline = interpolate_rel_pos_table(shared, 732, (14, 14))
    assert torch.equal(model.blocks[5].attn.relative_position_bias_table, spline)
    from timm.layers import resize_rel_pos_bias_table
    linear = resize_rel_pos_bias_table(shared, new_window_size=(14, 14), new_bias_shape=(732, 3))
    assert not torch.allclose(linear, spline, atol=1e-3)  # what timm's own filter would have loaded


def test_export_loader_agrees_with_load_pretrained(tmp_path):
    path = str(write_mcbeit_pretraining(tmp_path / 'ckpt.pth'))
    exported = load_for_export(path).model
    backbone = build(CLS, num_classes=0, global_pool='token', use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    load_pretrained(backbone, path)
    assert_all_equal({'load_pretrained': backbone, 'load_for_export': exported})


def test_features_only_loads_before_wrapping(tmp_path):
    path = str(write_mcbeit_pretraining(tmp_path / 'ckpt.pth'))
    features = build(CLS, pretrained=True, features_only=True, out_indices=(2,),
                     pretrained_cfg_overlay=dict(file=path), **CLS_KW)
    ref = build(CLS, **CLS_KW)
    load_pretrained(ref, path)
    for k, v in features.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k.removeprefix('model.')]), k
    assert 'state_dict' not in features.pretrained_cfg
    assert features(torch.randn(1, 3, 224, 224))[0].shape == (1, 192, 14, 14)


def test_filter_fn_refuses_what_does_not_fit_and_no_file_means_no_weights():
    small = timm.create_model('beit_small_patch16_224_8k_vocab', depth=1)
    with pytest.raises(StateDictMismatchError, match='pretrained weights: .*shape mismatch'):
        checkpoint_filter_fn({'model': small.state_dict()}, build(CLS, depth=1))
    for name in (CLS, MIM):
        with pytest.raises(ValueError, match='never downloads'):
            timm.create_model(name, pretrained=True)
