"""Mask R-CNN on BEiT: windows and tables as mc-BEiT's benchmarking.py, torchvision's heads with detectron2's parts."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import roi_align

from mcbeit.errors import ConfigError, InputError
from mcbeit.models.checkpoint import StateDictMismatchError
from mcbeit.models.det_backbone import RelativePositionBias, default_global_blocks
from mcbeit.models.detection import (IMAGENET_MEAN, IMAGENET_STD, BeitMaskRCNN, _mask_targets, build_detector,
                                     load_backbone_weights)
from mcbeit.models.position_resize import interpolate_rel_pos_table

pytestmark = pytest.mark.usefixtures("one_thread")

S = 128  # 8x8 tokens, 2x2 windows of 4x4
TINY = dict(model='beit_tiny_patch16_224', num_classes=3, img_size=S, window_size=4, depth=4, global_blocks=(1, 3),
            out_indices=(0, 1, 2, 3), fpn_channels=32, box_fc_dim=64, rpn_batch_size_per_image=64,
            box_batch_size_per_image=32)
SHARED = 'rel_pos_bias.relative_position_bias_table'
LOSSES = {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask'}


def tiny(seed=0, **kwargs) -> BeitMaskRCNN:
    torch.manual_seed(seed)
    return build_detector(**{**TINY, **kwargs})


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter off its initialisation (zero tables would hide copying and indexing mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def images(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, S, S, generator=g) for _ in range(n)]


def targets():
    """Two objects in image 0 (boxes from their masks), none in image 1."""
    masks = torch.zeros(2, S, S, dtype=torch.uint8)
    masks[0, 20:60, 10:80] = 1
    masks[1, 70:120, 60:110] = 1
    return [{'boxes': torch.tensor([[10., 20, 80, 60], [60, 70, 110, 120]]), 'labels': torch.tensor([1, 3]),
             'masks': masks, 'image_id': 1, 'iscrowd': torch.zeros(2, dtype=torch.uint8)},
            {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64),
             'masks': torch.zeros(0, S, S, dtype=torch.uint8), 'image_id': 2}]


def original_index(size):
    """benchmarking.py's RelativePositionBias index (no CLS rows)."""
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')).flatten(1)  # (2,n)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (size - 1)  # (n,n,2)
    return rel[:, :, 0] * (2 * size - 1) + rel[:, :, 1]  # (n,n)


# ---------------------------------------------------------------------- structure
def test_pyramid_levels_adaptor_and_defaults():
    model = tiny()
    x = torch.stack(images())
    body = model.backbone.body
    assert [tuple(f.shape) for f in body(x)] == [(2, 192, 8, 8)] * 4  # blocks 0..3, no CLS, no final norm
    levels = model.backbone(x)
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        '0': (2, 32, 32, 32), '1': (2, 32, 16, 16), '2': (2, 32, 8, 8), '3': (2, 32, 4, 4), 'pool': (2, 32, 2, 2)}
    up4, up2, same, down = model.backbone.ms_adaptor
    assert [type(m) for m in up4] == [nn.ConvTranspose2d, nn.GroupNorm, nn.GELU, nn.ConvTranspose2d]
    assert up4[1].num_groups == 32 and isinstance(up2, nn.ConvTranspose2d)
    assert isinstance(same, nn.Identity) and isinstance(down, nn.MaxPool2d)
    assert body.cls_token is None and isinstance(body.norm, nn.Identity)
    assert body.pos_embed.shape == (1, 64, 192) and not body.pos_embed.any()  # zero_pos_embed=True
    assert default_global_blocks(12) == [2, 5, 8, 11] and default_global_blocks(24) == [5, 11, 17, 23]
    # detectron2's anchors: area size^2, height / width = ratio, not rounded to pixels
    cell = model.rpn.anchor_generator.cell_anchors[0]  # (3,4) for 32 px
    w = torch.sqrt(32. ** 2 / torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(cell, torch.stack([-w, -w * torch.tensor([0.5, 1, 2]), w,
                                                  w * torch.tensor([0.5, 1, 2])], 1) / 2)
    assert model.roi_heads.box_roi_pool.output_size == (7, 7) and model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert isinstance(model.roi_heads.box_head[0][1], nn.BatchNorm2d)
    assert isinstance(tiny(sync_bn=True).roi_heads.mask_head[0][1], nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match='multiple of the window'):
        tiny(window_size=3)


def test_window_blocks_see_only_their_window_and_global_blocks_see_all():
    model = randomized(tiny(drop_path=0.0), 1).eval()
    body = model.backbone.body
    x = torch.stack(images(1, n=1))
    x2 = x.clone()
    x2[..., 64:, 64:] = torch.rand(3, 64, 64)  # the bottom-right window's pixels (tokens 4..7 x 4..7)
    with torch.no_grad():
        a, b = body(x), body(x2)
    # after block 0 (windowed): the other windows' tokens are unchanged, the changed window's are not
    assert torch.equal(a[0][..., :4, :], b[0][..., :4, :]) and torch.equal(a[0][..., 4:, :4], b[0][..., 4:, :4])
    assert not torch.allclose(a[0][..., 4:, 4:], b[0][..., 4:, 4:])
    # after block 1 (global): every token has seen the change
    assert not torch.allclose(a[1][..., :4, :4], b[1][..., :4, :4])
    # block 0 is timm's block on one window's 16 tokens (raster order) with the windowed table's bias
    with torch.no_grad():
        tokens = body.patch_embed(x) + body.pos_embed  # (1,64,D)
        window = tokens.reshape(1, 8, 8, -1)[:, :4, 4:].reshape(1, 16, -1)  # top-right window
        out = body.blocks[0](window, shared_rel_pos_bias=body.windowed_rel_pos_bias())
    torch.testing.assert_close(a[0][0, :, :4, 4:].reshape(192, 16).t(), out[0])


def test_relative_tables_per_window_and_grid():
    body = tiny().backbone.body
    heads = 3
    assert body.windowed_rel_pos_bias.relative_position_bias_table.shape == (7 * 7, heads)  # window 4
    assert body.global_rel_pos_bias.relative_position_bias_table.shape == (15 * 15, heads)  # 8x8 grid
    assert body.rel_pos_bias is None
    per_block = tiny(shared_rel_pos_bias=False).backbone.body
    assert per_block.windowed_rel_pos_bias is None and per_block.global_rel_pos_bias is None
    assert [m.relative_position_bias_table.shape[0] for m in per_block.rel_pos_bias] == [49, 225, 49, 225]
    plain = tiny(rel_pos_bias=False).backbone.body
    assert not [n for n, _ in plain.named_parameters() if 'relative_position' in n]
    # the bias is the table gathered by the original's index
    for size in (4, 8):
        bias = randomized(RelativePositionBias(size, heads), size)
        table = bias.relative_position_bias_table
        expected = table[original_index(size).reshape(-1)].reshape(size ** 2, size ** 2, heads).permute(2, 0, 1)
        assert torch.equal(bias(), expected)


# ---------------------------------------------------------------------- training and inference
def test_a_train_step_gives_torchvisions_five_losses_and_reaches_the_vit():
    model = tiny()
    model.train()
    losses = model(images(), targets())
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP without find_unused_parameters
    body = model.backbone.body
    assert body.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and body.pos_embed.grad.abs().sum() > 0
    assert body.windowed_rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    assert body.global_rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0


def test_rpn_losses_are_detectron2s():
    """BCE summed over the sampled anchors, L1 (smooth_l1_beta=0) over the positive ones, both / (256 x images)."""
    rpn = tiny(rpn_batch_size_per_image=256).rpn
    g = torch.Generator().manual_seed(0)
    labels = [torch.tensor([1., 0, -1, 0, 1, 0]), torch.tensor([0., 0, 1, -1, -1, 0])]  # few: all are sampled
    objectness = torch.randn(12, 1, generator=g)
    deltas, targets_ = torch.randn(12, 4, generator=g), [torch.randn(6, 4, generator=g) for _ in range(2)]
    loss_obj, loss_box = rpn.compute_loss(objectness, deltas, labels, targets_)
    lab, tgt = torch.cat(labels), torch.cat(targets_)
    valid, pos = lab >= 0, lab == 1
    torch.testing.assert_close(
        loss_obj, F.binary_cross_entropy_with_logits(objectness[valid, 0], lab[valid], reduction='sum') / 512)
    torch.testing.assert_close(loss_box, (deltas[pos] - tgt[pos]).abs().sum() / 512)


def test_mask_targets_are_aligned_crops_binarised():
    """A box on a mask's edges gives an all-ones target (detectron2's BitMasks.crop_and_resize); torchvision's
    unaligned crop loses the last row and column."""
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:24, 16:40] = 1
    box = torch.tensor([[16., 8, 40, 24]])
    target = _mask_targets(masks, box, torch.zeros(1, dtype=torch.int64), 28)
    assert target.shape == (1, 28, 28) and bool((target == 1).all())
    unaligned = roi_align(masks[:, None].float(), torch.tensor([[0., 16, 8, 40, 24]]), (28, 28), 1.0, 0)[0, 0]
    assert not bool((unaligned >= 0.5).all())


def test_eval_outputs_are_in_the_input_pixels():
    model = randomized(tiny(), 2)
    for name, buf in model.named_buffers():  # BN statistics of a trained model: finite and positive
        if name.endswith('running_var'):
            buf.fill_(1.0)
    model.eval()
    x = images(2)
    with torch.no_grad():
        out = model(x)
        # the same pieces by hand: the transform only normalises; no resizing of boxes or images
        batch, _ = model.transform(x)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        torch.testing.assert_close(batch.tensors, (torch.stack(x) - mean) / std)
        assert batch.image_sizes == [(S, S)] * 2
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        raw, _ = model.roi_heads(features, proposals, batch.image_sizes)
    assert len(out) == 2 and out[0]['boxes'].shape[0] > 0
    for o, r in zip(out, raw, strict=True):
        assert set(o) == {'boxes', 'labels', 'scores', 'masks'}
        torch.testing.assert_close(o['boxes'], r['boxes'])
        k = o['boxes'].shape[0]
        assert k <= 100 and bool((o['boxes'] >= 0).all()) and bool((o['boxes'] <= S).all())
        assert o['masks'].shape == (k, 1, S, S) and 0 <= o['masks'].min() and o['masks'].max() <= 1
        assert bool((o['scores'] > 0.05).all()) and set(o['labels'].tolist()) <= {1, 2, 3}
    model.transform.paste_masks = False  # the mask head's probabilities, to paste at the original size
    with torch.no_grad():
        assert model(x)[0]['masks'].shape[1:] == (1, 28, 28)
    with pytest.raises(InputError, match=r'\(3, 128, 128\)'):
        model([torch.rand(3, 96, 128)])


def test_boxes_are_decoded_in_float32_under_autocast():
    model = tiny()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(images(), targets())
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        model.eval()
        with torch.no_grad():
            batch, _ = model.transform(images())
            features = model.backbone(batch.tensors)
            assert features['0'].dtype == torch.bfloat16
            anchors = model.rpn.anchor_generator(batch, list(features.values()))
            proposals, _ = model.rpn(batch, features)
            out = model(images())
    assert anchors[0].dtype == proposals[0].dtype == torch.float32
    assert {v.dtype for o in out for v in (o['boxes'], o['scores'], o['masks'])} == {torch.float32}


def test_roi_align_is_aligned_half_a_feature_pixel_from_torchvisions():
    pooler = tiny().roi_heads.box_roi_pool
    g = torch.Generator().manual_seed(3)
    features = {name: torch.randn(1, 4, S // s, S // s, generator=g) for name, s in zip('0123', (4, 8, 16, 32),
                                                                                        strict=True)}
    small = torch.tensor([[10.3, 20.1, 60.7, 70.2]])  # ~50 px: level p2 (stride 4)
    large = torch.tensor([[3.0, 5.5, 120.0, 126.0]])  # ~119 px: level p3 (stride 8)
    for box, level, stride in ((small, '0', 4), (large, '1', 8)):
        pooled = pooler(features, [box], [(S, S)])
        rois = torch.cat([torch.zeros(1, 1), box], 1)
        aligned = roi_align(features[level], rois, (7, 7), 1 / stride, sampling_ratio=0, aligned=True)
        unaligned = roi_align(features[level], rois, (7, 7), 1 / stride, sampling_ratio=0, aligned=False)
        torch.testing.assert_close(pooled, aligned)
        assert not torch.allclose(pooled, unaligned)
        # aligned=True is aligned=False on the box moved by half a feature pixel (stride / 2 input pixels)
        shifted = torch.cat([torch.zeros(1, 1), box - stride / 2], 1)
        torch.testing.assert_close(pooled, roi_align(features[level], shifted, (7, 7), 1 / stride, 0, aligned=False))


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for flag in (False, True):
        model = tiny(seed=4, grad_checkpointing=flag)
        torch.manual_seed(5)  # drop path and the samplers draw
        losses = model(images(4), targets())
        total = sum(losses.values())
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.backbone.body.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


def test_vitdet_pyramid_builds_and_runs():
    model = tiny(pyramid='vitdet', out_indices=None)
    assert model.backbone.body.out_indices == [3] and not hasattr(model.backbone, 'fpn')
    assert isinstance(model.roi_heads.box_head[0][1], LayerNorm2d)  # ViTDet's heads use LN
    levels = model.backbone(torch.stack(images()))
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        '0': (2, 32, 32, 32), '1': (2, 32, 16, 16), '2': (2, 32, 8, 8), '3': (2, 32, 4, 4), 'pool': (2, 32, 2, 2)}
    stage4 = model.backbone.simple_fpn.stages[0]
    assert [type(m) for m in stage4[:4]] == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert stage4[0].out_channels == 96 and stage4[3].out_channels == 48
    losses = model(images(), targets())
    assert set(losses) == LOSSES
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------------- backbone weights
def write_pretraining(path, seed=1, model='beit_tiny_patch16_224_8k_vocab', **kwargs):
    """This package's pre-training checkpoint of a 4-block BEiT at 224 px: shared table, mask_token, lm_head, norm."""
    mim = randomized(timm.create_model(model, vocab_size=64, depth=4, **kwargs), seed)
    sd = {k: v.clone() for k, v in mim.state_dict().items()}
    torch.save({'format': 'mcbeit-pretrain-v1', 'model': sd, 'optimizer': {}, 'epoch': 3}, path)
    return sd


def bicubic(table, size):
    """The original's resize_pos_embed(table[None, :-3], new[None], 0)."""
    src = int(math.isqrt(table.shape[0] - 3))
    grid = table[:-3].reshape(1, src, src, -1).permute(0, 3, 1, 2)
    side = 2 * size - 1
    grid = F.interpolate(grid, size=(side, side), mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1)


def accounted(report, sd, body):
    """Every checkpoint key: loaded under its name, used for the detector's tables, or dropped with a reason."""
    own = body.state_dict()
    loaded = {k for k in sd if k in own and k not in report.dropped and torch.equal(own[k], sd[k])}
    used = {k.split(' -> ')[0] for k, _, _ in report.interpolated}
    return loaded | used | set(report.dropped) == set(sd)


def test_pretraining_checkpoint_loads_the_vit_and_lists_every_key(tmp_path):
    sd = write_pretraining(tmp_path / 'pt.pth')
    model = tiny()
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('backbone.body.')}
    report = load_backbone_weights(model, tmp_path / 'pt.pth')
    body = model.backbone.body.state_dict()
    for k in ('patch_embed.proj.weight', 'blocks.2.attn.qkv.weight', 'blocks.3.gamma_2', 'blocks.1.attn.q_bias'):
        assert torch.equal(body[k], sd[k]), k
    torch.testing.assert_close(body['windowed_rel_pos_bias.relative_position_bias_table'], bicubic(sd[SHARED], 4))
    torch.testing.assert_close(body['global_rel_pos_bias.relative_position_bias_table'], bicubic(sd[SHARED], 8))
    assert (f'{SHARED} -> windowed_rel_pos_bias.relative_position_bias_table', (732, 3), (49, 3)) in report.interpolated
    assert report.dropped == {
        'cls_token': 'class token: the detection backbone has none, as the original',
        'mask_token': 'pre-training only (masked image modeling)',
        'lm_head.weight': 'pre-training only (masked image modeling)',
        'lm_head.bias': 'pre-training only (masked image modeling)',
        'norm.weight': 'final norm: the detection backbone has none, as the original',
        'norm.bias': 'final norm: the detection backbone has none, as the original'}
    assert accounted(report, sd, model.backbone.body)
    assert report.fresh[0] == 'backbone.body.pos_embed' and set(report.fresh[1:]) == set(heads_before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in heads_before.items())  # the neck and heads untouched
    summary = report.summary()
    assert 'windowed_rel_pos_bias' in summary and 'roi_heads.box_predictor.cls_score.weight' in summary

    # a per-block detector (the _ft_ config) from the shared table: copied into every block, then the spline
    model = tiny(shared_rel_pos_bias=False)
    report = load_backbone_weights(model, tmp_path / 'pt.pth')
    assert report.expanded_shared_rel_pos_bias and accounted(report, sd, model.backbone.body)
    torch.testing.assert_close(model.backbone.body.rel_pos_bias[1].relative_position_bias_table,
                               interpolate_rel_pos_table(sd[SHARED], 15 * 15 + 3, (8, 8))[:-3])


def test_fine_tuned_checkpoint_per_block_tables(tmp_path):
    """A fine-tuned classifier (a table per block, mean pooling): the _ft_ config resamples each block's table by the
    original's spline; a shared-bias detector drops them (its tables start at zero, as the original)."""
    clf = randomized(timm.create_model('beit_tiny_patch16_224', depth=4, num_classes=10, use_rel_pos_bias=True,
                                       use_abs_pos_emb=True, global_pool='avg', init_values=0.1), 3)
    sd = clf.state_dict()
    torch.save({'model': sd}, tmp_path / 'ft.pth')
    model = tiny(shared_rel_pos_bias=False)
    report = load_backbone_weights(model, tmp_path / 'ft.pth')
    tables = model.backbone.body.rel_pos_bias
    for i, (size, rows) in enumerate(((4, 49), (8, 225), (4, 49), (8, 225))):
        expected = interpolate_rel_pos_table(sd[f'blocks.{i}.attn.relative_position_bias_table'], rows + 3,
                                             (size, size))[:-3]
        torch.testing.assert_close(tables[i].relative_position_bias_table, expected)
    assert sorted(report.dropped) == ['cls_token', 'fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight',
                                      'pos_embed']
    assert 'zero_pos_embed' in report.dropped['pos_embed'] and not model.backbone.body.pos_embed.any()
    assert accounted(report, sd, model.backbone.body)

    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'ft.pth')
    assert 'shared_rel_pos_bias=False' in report.dropped['blocks.2.attn.relative_position_bias_table']
    assert not model.backbone.body.windowed_rel_pos_bias.relative_position_bias_table.any()
    assert 'backbone.body.windowed_rel_pos_bias.relative_position_bias_table' in report.fresh
    assert accounted(report, sd, model.backbone.body)


def test_a_checkpoint_of_another_size_is_a_clear_error(tmp_path):
    write_pretraining(tmp_path / 'small.pth', model='beit_small_patch16_224_8k_vocab')
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match='shape mismatch: blocks.0.attn.qkv.weight'):
        load_backbone_weights(model, tmp_path / 'small.pth')
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_vit_of_a_whole_detector_file(tmp_path):
    source = randomized(tiny(), 6)
    torch.save({'model': source.state_dict(), 'iteration': 10}, tmp_path / 'det.pth')
    model = tiny(seed=1)
    report = load_backbone_weights(model, tmp_path / 'det.pth')
    for k, v in source.backbone.body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[k], v), k
    assert report.dropped and all(why == "outside --model_prefix 'backbone.body.'" for why in report.dropped.values())
    head = 'roi_heads.box_predictor.cls_score.weight'
    assert not torch.equal(model.state_dict()[head], source.state_dict()[head])  # only the ViT is loaded


def test_released_pretraining_files_of_every_method_load_into_the_vit(tmp_path):
    """BEiT v2 (unilm's _cls_pt layout, and mmpretrain's names of it) and ConMIM (its teacher copy with the
    projectors) pre-training files: pre-training heads dropped and listed, the shared table resized to the window
    and the grid, every key accounted for."""
    from tests.models.test_released_v2 import to_mmpretrain, unilm_v2_pretraining_sd

    v2 = unilm_v2_pretraining_sd(depth=4)  # tiny, 14x14 grid, 2 head layers
    torch.save({'model': v2}, tmp_path / 'v2.pth')
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'v2.pth')
    assert accounted(report, v2, model.backbone.body)
    assert {k.split('.')[0] for k in report.dropped if 'relative_position_index' not in k} == {
        'cls_token', 'mask_token', 'lm_head', 'cls_pt_layers', 'norm'}
    body = model.backbone.body.state_dict()
    assert torch.equal(body['blocks.3.attn.qkv.weight'], v2['blocks.3.attn.qkv.weight'])
    torch.testing.assert_close(body['global_rel_pos_bias.relative_position_bias_table'], bicubic(v2[SHARED], 8))

    torch.save({'meta': {'epoch': 300}, 'state_dict': to_mmpretrain(v2)}, tmp_path / 'mmpretrain.pth')
    again = tiny(seed=1)
    load_backbone_weights(again, tmp_path / 'mmpretrain.pth')
    for k, v in body.items():
        if k != 'pos_embed':
            assert torch.equal(again.backbone.body.state_dict()[k], v), k

    conmim = randomized(timm.create_model('conmim_tiny_patch16_224', depth=4, proj_hidden_dim=32, proj_dim=16), 5)
    sd = conmim.state_dict()
    torch.save({'model': sd, 'epoch': 799}, tmp_path / 'checkpoint_copy-799.pth')
    model = tiny()
    report = load_backbone_weights(model, tmp_path / 'checkpoint_copy-799.pth')
    assert accounted(report, sd, model.backbone.body)
    assert {k.split('.')[0] for k in report.dropped if 'relative_position_index' not in k} == {
        'cls_token', 'mask_token', 'lm_head', 'projectors', 'norm'}
    torch.testing.assert_close(model.backbone.body.windowed_rel_pos_bias.relative_position_bias_table,
                               bicubic(sd[SHARED], 4))
    assert torch.equal(model.backbone.body.state_dict()['blocks.1.mlp.fc2.weight'], sd['blocks.1.mlp.fc2.weight'])
