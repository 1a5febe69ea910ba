"""UperNet on BEiT: the original's structure and names (unilm backbone/beit.py, mmseg 0.11 heads), its weights loaders."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.engine.optim import layer_id
from mcbeit.errors import ConfigError, InputError
from mcbeit.models.checkpoint import StateDictMismatchError
from mcbeit.models.position_resize import interpolate_rel_pos_table
from mcbeit.models.segmentation import (BeitSegmentationBackbone, UperNetSegmentor, backbone_size, build_segmentor,
                                        default_out_indices, load_backbone_weights, load_segmentation_checkpoint)
from mcbeit.objectives.segmentation import upernet_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model='beit_tiny_patch16_224', num_classes=5, img_size=64, channels=32, aux_channels=16)
SHARED = 'rel_pos_bias.relative_position_bias_table'


def tiny(seed=0, **kwargs) -> UperNetSegmentor:
    torch.manual_seed(seed)
    return build_segmentor(**{**TINY, **kwargs})


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every tensor off its initialisation (zero tables and unit BN would hide copying mistakes); BN variances > 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def images(seed=0, n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- structure
def test_forward_shapes_at_64px_and_aux_only_in_training():
    model = tiny()
    x = images()
    levels = model.backbone(x)
    assert [tuple(f.shape) for f in levels] == [(2, 192, 16, 16), (2, 192, 8, 8), (2, 192, 4, 4), (2, 192, 2, 2)]
    logits, aux = model(x)
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)  # strides 4 and 16
    model.eval()
    logits, aux = model(x)
    assert aux is None
    full = model.encode_decode(x)
    assert full.shape == (2, 5, 64, 64)
    torch.testing.assert_close(full, F.interpolate(logits, size=(64, 64), mode='bilinear', align_corners=False))
    assert model.num_classes == 5 and model.crop_size == (64, 64)
    assert build_segmentor(**{**TINY, 'aux': False}).auxiliary_head is None


def test_levels_are_the_block_outputs_without_norm_and_the_neck_is_the_originals():
    model = randomized(tiny(), 1).eval()
    x = images(1)
    levels = model.backbone.forward_levels(x)
    # timm's own path: outputs after blocks 3, 5, 7, 11, no norm, CLS dropped, as NCHW maps
    reference = timm.models.beit.Beit.forward_intermediates(model.backbone, x, indices=[3, 5, 7, 11], norm=False,
                                                             intermediates_only=True)
    for ours, ref in zip(levels, reference, strict=True):
        torch.testing.assert_close(ours, ref)
    assert isinstance(model.backbone.norm, nn.Identity)
    out = model.backbone(x)
    bb = model.backbone
    fpn1 = F.conv_transpose2d(F.gelu(bb.fpn1[1](F.conv_transpose2d(levels[0], bb.fpn1[0].weight, bb.fpn1[0].bias,
                                                                     stride=2))), bb.fpn1[3].weight, bb.fpn1[3].bias,
                              stride=2)
    torch.testing.assert_close(out[0], fpn1)
    torch.testing.assert_close(out[1], F.conv_transpose2d(levels[1], bb.fpn2[0].weight, bb.fpn2[0].bias, stride=2))
    assert torch.equal(out[2], levels[2])
    assert torch.equal(out[3], F.max_pool2d(levels[3], 2, 2))


def test_out_indices_are_proportional_to_depth():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]  # unilm's large configs
    deep = BeitSegmentationBackbone(img_size=32, embed_dim=16, depth=24, num_heads=2, use_abs_pos_emb=False,
                                    use_rel_pos_bias=True, init_values=0.1)
    assert deep.out_indices == [7, 11, 15, 23]
    assert [f.shape[-1] for f in deep(torch.randn(1, 3, 32, 32))] == [8, 4, 2, 1]
    assert build_segmentor(**{**TINY, 'out_indices': [1, 2, 3, 4]}).backbone.out_indices == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match='4 increasing'):
        build_segmentor(**{**TINY, 'out_indices': [3, 5, 11]})
    with pytest.raises(ConfigError, match='4 increasing'):
        build_segmentor(**{**TINY, 'out_indices': [3, 5, 7, 12]})


def test_model_names_mean_their_size():
    assert backbone_size('beit_base_patch16_224') == (768, 12, 12)
    assert backbone_size('beit_large_patch16_224_8k_vocab') == (1024, 24, 16)
    assert backbone_size('beit_base_patch16_224_8k_vocab_cls_pt') == (768, 12, 12)
    assert backbone_size('conmim_small_patch16_224') == (384, 12, 6)
    assert backbone_size('beitv2_base_patch16_224.in1k_ft_in22k') == (768, 12, 12)
    with pytest.raises(ConfigError, match='not a BEiT model'):
        backbone_size('vit_base_patch16_224')
    with pytest.raises(ConfigError, match='16-pixel'):
        backbone_size('beit_base_patch8_224')
    with pytest.raises(ConfigError, match='multiple of 16'):
        build_segmentor(**{**TINY, 'img_size': 72})
    with pytest.raises(ConfigError, match='255'):
        build_segmentor(**{**TINY, 'num_classes': 300})
    with pytest.raises(ConfigError, match='init'):
        build_segmentor(**{**TINY, 'init': 'kaiming'})


def test_an_input_of_another_size_is_a_clear_error():
    with pytest.raises(InputError, match='64x64 inputs.*sliding-window'):
        tiny().encode_decode(torch.randn(1, 3, 64, 96))


def test_uperhead_is_mmsegs_forward():
    head = randomized(tiny(), 2).decode_head.eval()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 192, s, s, generator=g) for s in (16, 8, 4, 2)]

    # ---- literal restatement of mmseg 0.11 decode_heads/uper_head.py L76-126 (+ psp_head.py PPM.forward L47-57,
    # ---- decode_head.py cls_seg L207-212), on our modules; align_corners=False
    def resize(input, size, mode, align_corners):
        return F.interpolate(input, size, None, mode, align_corners)

    def ppm_forward(self, x):
        ppm_outs = []
        for ppm in self:
            ppm_out = ppm(x)
            upsampled_ppm_out = resize(ppm_out, size=x.size()[2:], mode='bilinear', align_corners=False)
            ppm_outs.append(upsampled_ppm_out)
        return ppm_outs

    def psp_forward(self, inputs):
        x = inputs[-1]
        psp_outs = [x]
        psp_outs.extend(ppm_forward(self.psp_modules, x))
        psp_outs = torch.cat(psp_outs, dim=1)
        output = self.bottleneck(psp_outs)
        return output

    def forward(self, inputs):
        laterals = [lateral_conv(inputs[i]) for i, lateral_conv in enumerate(self.lateral_convs)]
        laterals.append(psp_forward(self, inputs))
        used_backbone_levels = len(laterals)
        for i in range(used_backbone_levels - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] += resize(laterals[i], size=prev_shape, mode='bilinear', align_corners=False)
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels - 1)]
        fpn_outs.append(laterals[-1])
        for i in range(used_backbone_levels - 1, 0, -1):
            fpn_outs[i] = resize(fpn_outs[i], size=fpn_outs[0].shape[2:], mode='bilinear', align_corners=False)
        fpn_outs = torch.cat(fpn_outs, dim=1)
        output = self.fpn_bottleneck(fpn_outs)
        if self.dropout is not None:
            output = self.dropout(output)
        output = self.conv_seg(output)
        return output
    # ---- end of the restatement

    with torch.no_grad():
        torch.testing.assert_close(head(inputs), forward(head, inputs))


def expected_released_keys(depth, aux=True):
    """Fact sheet 11: the keys of a released unilm ADE20K file, relative_position_index buffers included."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    keys = ['backbone.cls_token', 'backbone.patch_embed.proj.weight', 'backbone.patch_embed.proj.bias']
    for i in range(depth):
        b = f'backbone.blocks.{i}.'
        keys += [b + k for k in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'gamma_1', 'gamma_2',
                                 'attn.qkv.weight', 'attn.q_bias', 'attn.v_bias', 'attn.relative_position_bias_table',
                                 'attn.relative_position_index', 'attn.proj.weight', 'attn.proj.bias',
                                 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')]
    keys += ['backbone.fpn1.0.weight', 'backbone.fpn1.0.bias', 'backbone.fpn1.3.weight', 'backbone.fpn1.3.bias',
             'backbone.fpn2.0.weight', 'backbone.fpn2.0.bias'] + [f'backbone.fpn1.1.{k}' for k in bn]

    def conv_module(prefix):
        return [prefix + '.conv.weight'] + [f'{prefix}.bn.{k}' for k in bn]
    keys += ['decode_head.conv_seg.weight', 'decode_head.conv_seg.bias']
    for name in [f'psp_modules.{i}.1' for i in range(4)] + ['bottleneck', 'fpn_bottleneck'] + \
            [f'{m}.{i}' for m in ('lateral_convs', 'fpn_convs') for i in range(3)]:
        keys += conv_module('decode_head.' + name)
    if aux:
        keys += conv_module('auxiliary_head.convs.0') + ['auxiliary_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias']
    return keys


@pytest.mark.parametrize('crop,rows', [(512, 3972), (640, 6244)])
def test_released_key_names_and_shapes(crop, rows):
    with torch.device('meta'):  # ViT-B UperNet at its real size, no memory
        model = build_segmentor('beit_base_patch16_224', num_classes=150, img_size=crop, sync_bn=True)
    sd = model.state_dict()
    expected = expected_released_keys(12)
    assert sorted(sd) == sorted(k for k in expected if not k.endswith('relative_position_index'))
    shapes = {'decode_head.bottleneck.conv.weight': (768, 3840, 3, 3),
              'decode_head.fpn_bottleneck.conv.weight': (768, 3072, 3, 3),
              'decode_head.psp_modules.3.1.conv.weight': (768, 768, 1, 1),
              'decode_head.lateral_convs.0.conv.weight': (768, 768, 1, 1),
              'decode_head.fpn_convs.2.conv.weight': (768, 768, 3, 3),
              'decode_head.conv_seg.weight': (150, 768, 1, 1),
              'backbone.fpn1.0.weight': (768, 768, 2, 2), 'backbone.fpn2.0.weight': (768, 768, 2, 2),
              'backbone.fpn1.1.running_mean': (768,),
              'auxiliary_head.convs.0.conv.weight': (256, 768, 3, 3),
              'auxiliary_head.conv_seg.weight': (150, 256, 1, 1),
              'backbone.blocks.11.attn.relative_position_bias_table': (rows, 12),
              'backbone.blocks.0.attn.qkv.weight': (2304, 768)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any(k.startswith(('backbone.norm', 'backbone.pos_embed', 'backbone.head', 'backbone.fc_norm'))
                   for k in sd)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert model.backbone.out_indices == [3, 5, 7, 11]


def test_sync_bn_switch_changes_the_class_not_the_computation():
    sync, plain = tiny(sync_bn=True), tiny(sync_bn=False)
    bns = [m for m in sync.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 + 4 + 1 + 3 + 3 + 1 + 1  # fpn1.1, PPM, bottleneck, laterals, fpn convs, fpn bottleneck, aux
    assert all(type(m) is nn.SyncBatchNorm for m in bns)
    assert all(type(m) is nn.BatchNorm2d for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert type(sync.backbone.fpn1[1]) is nn.SyncBatchNorm
    plain.load_state_dict(sync.state_dict())
    x = images(4)
    for mode in (True, False):  # training: batch statistics (no process group: SyncBN computes them locally)
        sync.train(mode), plain.train(mode)
        torch.manual_seed(0)
        a = sync(x)
        torch.manual_seed(0)
        b = plain(x)
        torch.testing.assert_close(a[0], b[0])


def test_initialisation_timm_or_original_and_heads_as_mmcv():
    timm_init, original = tiny(seed=0, init='timm'), tiny(seed=0, init='original')
    for model, last_scale in ((timm_init, 1 / math.sqrt(2 * 12)), (original, 1.0)):
        w = model.backbone.blocks[11].attn.proj.weight
        assert w.std().item() == pytest.approx(0.02 * last_scale, rel=0.1)  # fix_init_weight undone by 'original'
        assert model.backbone.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(model.backbone.blocks[3].attn.relative_position_bias_table == 0)
        assert torch.all(model.backbone.blocks[3].gamma_1 == 0.1)
    head = timm_init.decode_head
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert torch.all(head.conv_seg.bias == 0)
    conv = head.fpn_bottleneck.conv  # kaiming normal, fan_out, relu: std sqrt(2 / (out * k * k))
    assert conv.bias is None and conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    assert torch.all(head.fpn_bottleneck.bn.weight == 1) and torch.all(head.fpn_bottleneck.bn.bias == 0)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1


def test_layer_ids_for_layer_decay_and_no_exempt_names():
    model = tiny()
    names = [n for n, _ in model.named_parameters() if n.startswith('backbone.')]
    ids = {n: layer_id(n[len('backbone.'):], model.get_num_layers()) for n in names}
    assert ids['backbone.cls_token'] == 0 and ids['backbone.patch_embed.proj.weight'] == 0
    assert ids['backbone.blocks.0.attn.qkv.weight'] == 1 and ids['backbone.blocks.11.mlp.fc2.bias'] == 12
    assert ids['backbone.fpn1.0.weight'] == 13  # the neck is with the heads, as mmseg's constructor
    assert model.no_weight_decay() == set()  # the original decays cls_token and the relative tables


def test_a_training_step_reaches_every_parameter():
    """DDP runs with find_unused_parameters=False (as the original): every parameter must get a gradient."""
    model = tiny()
    label = torch.randint(0, 5, (2, 64, 64))
    label[:, :8] = 255
    torch.manual_seed(0)  # drop path and Dropout2d draw
    logits, aux = model(images(5))
    loss, parts = upernet_loss(logits, aux, label)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert set(parts) == {'loss_seg', 'loss_aux', 'acc_seg'}
    # activation checkpointing in the blocks: the same loss
    model.backbone.set_grad_checkpointing(True)
    torch.manual_seed(0)
    torch.testing.assert_close(upernet_loss(*model(images(5)), label)[0], loss)
    # one image per step cannot train BatchNorm without synchronisation: a clear error, not torch's
    with pytest.raises(InputError, match='at least 2'):
        model(images(5, n=1))
    model.eval()
    assert model(images(5, n=1))[0].shape == (1, 5, 16, 16)


# ---------------------------------------------------------------------- backbone weights
def write_pretraining(path, seed=1, **kwargs):
    """This package's pre-training checkpoint of a tiny BEiT at 224 px: shared table, mask_token, lm_head, norm."""
    mim = randomized(timm.create_model('beit_tiny_patch16_224_8k_vocab', vocab_size=64, **kwargs), seed)
    sd = {k: v.clone() for k, v in mim.state_dict().items()}
    torch.save({'format': 'mcbeit-pretrain-v1', 'model': sd, 'optimizer': {}, 'epoch': 3}, path)
    return sd


def accounted(report, sd, backbone):
    """Every checkpoint key: loaded under its name, expanded (the shared table) or dropped with a reason."""
    own = set(backbone.state_dict())
    loaded = {k for k in sd if k in own}
    expanded = {SHARED} if report.expanded_shared_rel_pos_bias else set()
    return loaded | expanded | set(report.dropped) == set(sd) and not (loaded & set(report.dropped))


def test_pretraining_checkpoint_shared_table_expanded_and_interpolated(tmp_path):
    sd = write_pretraining(tmp_path / 'pt.pth')
    model = tiny()
    heads_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    fpn_before = model.backbone.fpn1[0].weight.clone()
    report = load_backbone_weights(model, tmp_path / 'pt.pth')
    bb = model.backbone.state_dict()
    assert report.expanded_shared_rel_pos_bias
    table = interpolate_rel_pos_table(sd[SHARED], 7 * 7 + 3, (4, 4))  # 224 px (27*27+3 rows) -> 64 px (4x4 grid)
    assert table.shape == (52, 3)
    for i in range(12):
        torch.testing.assert_close(bb[f'blocks.{i}.attn.relative_position_bias_table'], table)
    assert ('blocks.0.attn.relative_position_bias_table', (732, 3), (52, 3)) in report.interpolated
    for k in ('cls_token', 'patch_embed.proj.weight', 'blocks.7.attn.qkv.weight', 'blocks.11.gamma_2'):
        assert torch.equal(bb[k], sd[k])
    assert report.dropped == {
        'mask_token': 'pre-training only (masked image modeling)',
        'lm_head.weight': 'pre-training only (masked image modeling)',
        'lm_head.bias': 'pre-training only (masked image modeling)',
        'norm.weight': 'the segmentation backbone has no final norm, as the original',
        'norm.bias': 'the segmentation backbone has no final norm, as the original'}
    assert sorted(report.fresh) == sorted(k for k in bb if k.startswith(('fpn1.', 'fpn2.')))
    assert torch.equal(model.backbone.fpn1[0].weight, fpn_before)
    assert all(torch.equal(v, heads_before[k]) for k, v in model.decode_head.state_dict().items())
    assert accounted(report, sd, model.backbone)
    assert 'no final norm' in report.summary() and 'fpn1.0.weight' in report.summary()


def test_pos_embed_and_classifier_keys_are_dropped_and_listed(tmp_path):
    sd = write_pretraining(tmp_path / 'abs.pth', seed=2, use_abs_pos_emb=True)
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'abs.pth')
    assert 'pos_embed' in report.dropped and 'abs_pos_emb=True' in report.dropped['pos_embed']
    assert accounted(report, sd, model.backbone)
    # with abs_pos_emb=True the embedding loads, resized 14x14 -> 4x4
    model = tiny(abs_pos_emb=True)
    report = load_backbone_weights(model, tmp_path / 'abs.pth')
    assert 'pos_embed' not in report.dropped and report.interpolated[-1] == ('pos_embed', (1, 197, 192), (1, 17, 192))

    # a fine-tuned classifier (mean pooling): head and fc_norm dropped, the tables per block already
    clf = randomized(timm.create_model('beit_tiny_patch16_224', num_classes=10, use_rel_pos_bias=True,
                                       use_abs_pos_emb=False, global_pool='avg', init_values=0.1), 3)
    clf_sd = clf.state_dict()
    torch.save({'model': clf_sd}, tmp_path / 'ft.pth')
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'ft.pth')
    assert sorted(report.dropped) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert not report.expanded_shared_rel_pos_bias and accounted(report, clf_sd, model.backbone)


def test_backbone_from_a_whole_segmentor_file(tmp_path):
    source = randomized(tiny(), 4)
    sd = write_released(tmp_path / 'seg.pth', source, prefix='module.')
    model = tiny(seed=1)
    report = load_backbone_weights(model, tmp_path / 'seg.pth')
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)
    assert report.fresh == []
    assert sorted(report.dropped) == sorted([k for k in sd if k.startswith(('decode_head.', 'auxiliary_head.'))] +
                                            [k[len('backbone.'):] for k in sd if k.endswith('relative_position_index')])
    assert not torch.equal(model.decode_head.conv_seg.weight, source.decode_head.conv_seg.weight)


def test_a_checkpoint_of_another_size_is_a_clear_error(tmp_path):
    write_pretraining(tmp_path / 'pt.pth')
    model = tiny(model='beit_small_patch16_224')
    with pytest.raises(StateDictMismatchError, match='shape mismatch'):
        load_backbone_weights(model, tmp_path / 'pt.pth')


# ---------------------------------------------------------------------- released ADE20K files
def write_released(path, model, prefix=''):
    """A file in unilm's released layout: meta, state_dict with every buffer (relative_position_index included),
    optimizer; what apex_runner's checkpoint saves."""
    sd = dict(model.state_dict())
    sd.update({f'backbone.{n}': b.clone() for n, b in model.backbone.named_buffers()
               if n.endswith('relative_position_index')})
    torch.save({'meta': {'mmseg_version': '0.11.0', 'config': 'model = dict(...)', 'iter': 160000, 'epoch': 80,
                         'CLASSES': tuple(f'class{i}' for i in range(5)), 'PALETTE': [[i, i, i] for i in range(5)]},
                'state_dict': {prefix + k: v for k, v in sd.items()},
                'optimizer': {'state': {}, 'param_groups': [{'lr': 8e-5, 'params': [0, 1]}]}}, path)
    return sd


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_released_ade20k_file_round_trip(tmp_path, prefix):
    source = randomized(tiny(), 5).eval()
    sd = write_released(tmp_path / 'ade.pth', source, prefix)
    assert sorted(sd) == sorted(expected_released_keys(12))  # the file has the original's key set
    model = tiny(seed=7).eval()
    report = load_segmentation_checkpoint(model, tmp_path / 'ade.pth')
    x = images(6)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_decode(x), source.encode_decode(x), rtol=0, atol=0)
    assert report.model_key == 'state_dict' and report.loaded == len(model.state_dict())
    assert sorted(report.dropped) == sorted(k for k in sd if k.endswith('relative_position_index'))
    assert set(report.dropped.values()) == {'buffer the model computes itself'}

    # no auxiliary head in the model (evaluation): the file's is dropped and listed
    report = load_segmentation_checkpoint(tiny(aux=False), tmp_path / 'ade.pth')
    assert sorted(k for k in report.dropped if k.startswith('auxiliary_head.')) == \
        sorted(k for k in sd if k.startswith('auxiliary_head.'))


def test_released_file_of_another_crop_is_interpolated(tmp_path):
    source = randomized(tiny(img_size=96), 6)  # 6x6 grid: 11*11+3 table rows
    sd = write_released(tmp_path / 'ade96.pth', source)
    model = tiny()
    report = load_segmentation_checkpoint(model, tmp_path / 'ade96.pth')
    key = 'backbone.blocks.4.attn.relative_position_bias_table'
    assert (key, (124, 3), (52, 3)) in report.interpolated and len(report.interpolated) == 12
    torch.testing.assert_close(model.state_dict()[key], interpolate_rel_pos_table(sd[key], 52, (4, 4)))
    assert torch.equal(model.decode_head.conv_seg.weight, source.decode_head.conv_seg.weight)


def test_a_file_that_does_not_fit_names_keys_and_leaves_the_model_unchanged(tmp_path):
    write_released(tmp_path / 'ade.pth', randomized(tiny(num_classes=7), 8))
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=r'(?s)decode_head.conv_seg.weight.*num_classes=7'):
        load_segmentation_checkpoint(model, tmp_path / 'ade.pth')
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.save({'state_dict': {k: v for k, v in tiny().state_dict().items() if not k.startswith('auxiliary_head.')}},
               tmp_path / 'noaux.pth')
    with pytest.raises(StateDictMismatchError, match='aux=False'):
        load_segmentation_checkpoint(tiny(), tmp_path / 'noaux.pth')


def test_released_pretraining_files_of_every_method_load_into_the_backbone(tmp_path):
    """BEiT v2 (unilm's _cls_pt layout, and mmpretrain's names of it) and ConMIM (its projector) pre-training files:
    their pre-training heads dropped and listed, the shared table expanded, every key accounted for."""
    from tests.models.test_released_v2 import to_mmpretrain, unilm_v2_pretraining_sd

    v2 = unilm_v2_pretraining_sd()                                          # tiny, 14x14 grid, 2 head layers
    torch.save({'model': v2}, tmp_path / 'v2.pth')
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'v2.pth')
    assert report.expanded_shared_rel_pos_bias and accounted(report, v2, model.backbone)
    assert {k.split('.')[0] for k in report.dropped if 'relative_position_index' not in k} == {
        'mask_token', 'lm_head', 'cls_pt_layers', 'norm'}
    assert 'cls_pt_layers.* (' in report.summary()
    bb = model.backbone.state_dict()
    assert torch.equal(bb['blocks.3.attn.qkv.weight'], v2['blocks.3.attn.qkv.weight'])

    torch.save({'meta': {'epoch': 300}, 'state_dict': to_mmpretrain(v2)}, tmp_path / 'mmpretrain.pth')
    again = tiny()
    load_backbone_weights(again, tmp_path / 'mmpretrain.pth')
    for k, v in model.backbone.state_dict().items():
        if not k.startswith(('fpn1.', 'fpn2.')):
            assert torch.equal(again.backbone.state_dict()[k], v), k

    conmim = randomized(timm.create_model('conmim_tiny_patch16_224', proj_hidden_dim=32, proj_dim=16), 5)
    sd = conmim.state_dict()
    torch.save({'model': sd, 'epoch': 799}, tmp_path / 'checkpoint_copy-799.pth')
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'checkpoint_copy-799.pth')
    assert accounted(report, sd, model.backbone)
    assert {k.split('.')[0] for k in report.dropped if 'relative_position_index' not in k} == {
        'mask_token', 'lm_head', 'projectors', 'norm'}
