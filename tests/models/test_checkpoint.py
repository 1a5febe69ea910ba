"""Checkpoint I/O: weights_only reading, released-format round trip, refusal of hostile pickles,
mismatch reports by name, and fine-tuning-style loading into timm's plain Beit."""
import argparse
import logging
import os

import pytest
import timm
import torch
from timm.models.beit import Beit, gen_relative_position_index

import mcbeit.models  # noqa: F401  (registers the names)
from mcbeit.models.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    extract_state_dict,
    filter_pretraining_state_dict,
    load_checkpoint_file,
    load_into,
)

IMG = 64  # N = 16 patches


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault('img_size', IMG)
    kw.setdefault('depth', 2)
    return timm.create_model('beit_tiny_patch16_224_8k_vocab', **kw).eval()


def released_format(model):
    """A checkpoint laid out as the original's save_model writes it."""
    sd = dict(model.state_dict())
    sd['rel_pos_bias.relative_position_index'] = model.rel_pos_bias.relative_position_index.clone()
    assert sd['rel_pos_bias.relative_position_index'].shape == (17, 17)
    assert sd['rel_pos_bias.relative_position_index'].dtype == torch.long
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    model.zero_grad(set_to_none=True)
    return {
        'model': sd,
        'args': argparse.Namespace(model='beit_tiny_patch16_224_8k_vocab', lr=1.5e-3, input_size=IMG,
                                   opt_betas=(0.9, 0.999), clip_grad=None, tokenizer_weight='/x/enc.pkl',
                                   layer_scale_init_value=0.1, mask_ratio=[0.75]),
        'epoch': 3,
        'optimizer': opt.state_dict(),
        'scaler': {'scale': 65536.0, 'growth_factor': 2.0, '_growth_tracker': 0},
    }


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 7:9] = True
    return x, mask


def test_released_format_round_trip(tmp_path):
    src = tiny(seed=0)
    path = tmp_path / 'checkpoint-3.pth'
    torch.save(released_format(src), path)  # plain torch.save, as the original

    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['args'].lr == 1.5e-3
    assert ckpt['epoch'] == 3 and 'state' in ckpt['optimizer']
    sd = filter_pretraining_state_dict(ckpt, tiny())  # a whole checkpoint is unwrapped too
    assert not any('relative_position_index' in k for k in sd)

    dst = tiny(seed=1)
    x, mask = inputs()
    with torch.no_grad():
        before = dst(x, mask)[1]
        report = load_into(dst, sd, strict=True)
        assert not report
        f_src, l_src = src(x, mask)
        f_dst, l_dst = dst(x, mask)
    assert not torch.equal(before, l_src)
    assert torch.equal(f_src, f_dst) and torch.equal(l_src, l_dst)


def test_released_index_is_what_timm_regenerates():
    # the original's formula for the relative position index, written out independently
    wh, ww = 4, 4
    n_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = [(i, j) for i in range(wh) for j in range(ww)]
    idx = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    for a, (ia, ja) in enumerate(coords):
        for b, (ib, jb) in enumerate(coords):
            idx[a + 1, b + 1] = (ia - ib + wh - 1) * (2 * ww - 1) + (ja - jb + ww - 1)
    idx[0, :] = n_rel - 3
    idx[:, 0] = n_rel - 2
    idx[0, 0] = n_rel - 1
    assert torch.equal(idx, gen_relative_position_index((wh, ww)))
    assert torch.equal(idx, tiny().rel_pos_bias.relative_position_index)


def test_filter_warns_on_a_foreign_index(caplog):
    model = tiny()
    sd = dict(model.state_dict())
    sd['rel_pos_bias.relative_position_index'] = torch.zeros(17, 17, dtype=torch.long)
    sd['blocks.0.attn.k_bias'] = torch.zeros(192)
    with caplog.at_level(logging.WARNING, logger='mcbeit.models.checkpoint'):
        out = filter_pretraining_state_dict(sd, model)
    assert 'relative_position_index' in caplog.text
    assert set(out) == set(model.state_dict())


def test_wrapped_state_dicts_are_unwrapped():
    model = tiny()
    sd = model.state_dict()
    ddp = {'module.' + k: v for k, v in sd.items()}
    for wrapped in ({'model': ddp}, {'module': sd}, {'state_dict': ddp}, ddp,
                    {'model': {'_orig_mod.' + k: v for k, v in sd.items()}}):
        out = extract_state_dict(wrapped)
        assert list(out) == list(sd)
        load_into(tiny(seed=2), filter_pretraining_state_dict(wrapped, model), strict=True)
    with pytest.raises(CheckpointError, match='no state dict'):
        extract_state_dict({'epoch': 3, 'args': argparse.Namespace()})


class _Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _Custom:
    def __init__(self):
        self.value = 1


def test_hostile_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': tiny().state_dict(), 'payload': _Hostile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert isinstance(info.value, RuntimeError)
    assert 'system' in str(info.value) and 'weights_only=False' in str(info.value)
    assert not marker.exists()


def test_other_globals_are_refused_by_name(tmp_path):
    path = tmp_path / 'custom.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'extra': _Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match='_Custom'):
        load_checkpoint_file(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointNotFoundError, match='directory'):
        load_checkpoint_file(tmp_path)
    text = tmp_path / 'notes.txt'
    text.write_text('hello world')
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint'):
        load_checkpoint_file(text)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint'):
        load_checkpoint_file(empty)
    bare = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), bare)
    with pytest.raises(CheckpointError, match='not a dict'):
        load_checkpoint_file(bare)


def test_other_architecture_names_mismatches(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model('beit_small_patch16_224_8k_vocab', img_size=IMG, depth=2)
    path = tmp_path / 'small.pth'
    torch.save({'model': small.state_dict()}, path)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = filter_pretraining_state_dict(load_checkpoint_file(path), model)
    with pytest.raises(StateDictMismatchError) as info:
        load_into(model, sd, strict=True)
    msg = str(info.value)
    assert 'cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)' in msg
    assert 'rel_pos_bias.relative_position_bias_table: checkpoint (52, 6) vs model (52, 3)' in msg
    assert 'lm_head.weight: checkpoint (8192, 384) vs model (8192, 192)' in msg
    assert len(info.value.report.mismatched) == len(sd) - 1  # all but lm_head.bias (8192,)
    # the model is untouched by a refused load
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys(caplog, capsys):
    model = tiny()
    sd = dict(model.state_dict())
    del sd['lm_head.bias']
    sd['blocks.5.gamma_1'] = torch.zeros(192)
    sd['norm.weight'] = torch.zeros(7)
    with pytest.raises(StateDictMismatchError) as info:
        load_into(tiny(), sd, strict=True)
    msg = str(info.value)
    assert 'missing (in the model, not in the checkpoint): lm_head.bias' in msg
    assert 'unexpected (in the checkpoint, not in the model): blocks.5.gamma_1' in msg
    assert 'norm.weight: checkpoint (7,) vs model (192,)' in msg

    target = tiny(seed=3)
    with caplog.at_level(logging.WARNING, logger='mcbeit.models.checkpoint'):
        report = load_into(target, sd, strict=False)
    assert report.missing == ['lm_head.bias'] and report.unexpected == ['blocks.5.gamma_1']
    assert report.mismatched == [('norm.weight', (7,), (192,))]
    assert 'lm_head.bias' in caplog.text and 'blocks.5.gamma_1' in caplog.text
    assert capsys.readouterr().out == ''  # logging, never print
    # the matching entries were loaded, the mismatched one was not
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)
    assert torch.all(target.norm.weight == 1)


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_fine_tuning_style_load_into_timm_beit(pool):
    pre = tiny()
    sd = filter_pretraining_state_dict({'model': pre.state_dict()}, pre)
    sd = {k: v for k, v in sd.items() if not k.startswith(('lm_head.', 'mask_token'))}
    clf = timm.create_model('beit_tiny_patch16_224', img_size=IMG, depth=2, num_classes=5, global_pool=pool,
                            use_rel_pos_bias=False, use_shared_rel_pos_bias=True).eval()
    assert type(clf) is Beit
    report = load_into(clf, sd, strict=False)
    assert not report.mismatched
    if pool == 'token':  # final norm kept: only the new head is missing
        assert sorted(report.missing) == ['head.bias', 'head.weight'] and report.unexpected == []
        x, _ = inputs()
        with torch.no_grad():
            assert torch.allclose(clf.forward_features(x), pre.forward_features(x), atol=1e-6)
    else:  # mean pooling: pre-training norm dropped, fc_norm starts fresh (as the original)
        assert sorted(report.missing) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
        assert sorted(report.unexpected) == ['norm.bias', 'norm.weight']
    for k in sd:
        if k in clf.state_dict():
            assert torch.equal(clf.state_dict()[k], sd[k]), k
