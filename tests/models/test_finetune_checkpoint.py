"""Fine-tuning from pre-trained checkpoints: sources (file, DeepSpeed folder, hub-cached URL,
safetensors), key selection, shared -> per-block relative tables, the original's spline
interpolation of relative tables and bicubic pos_embed resizing, and errors by name."""
import argparse
import os
import shutil
import urllib.error

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline

from mcbeit.engine.checkpoint import save_atomic
from mcbeit.models.checkpoint import (CheckpointError, CheckpointNotFoundError, StateDictMismatchError,
                                      UnsafeCheckpointError)
from mcbeit.models.classifier import build_classifier  # importing mcbeit.models registers the names
from mcbeit.models.beit_weights import load_for_finetuning
from mcbeit.models.position_resize import relative_position_coords

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE = 'blocks.{}.attn.relative_position_bias_table'


def classifier(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault('nb_classes', 10)
    return build_classifier(kw.pop('name', 'beit_tiny_patch16_224'), **kw).eval()


def randomized(model, seed):
    """Zero-initialised tables/gammas would hide copying and interpolation mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def clone_sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(path, state dict) of a checkpoint in our pre-training format (shared relative table, 224 px)."""
    torch.manual_seed(0)
    mim = timm.create_model('beit_tiny_patch16_224_8k_vocab', use_shared_rel_pos_bias=True, init_values=0.1,
                            vocab_size=64)
    randomized(mim, 1)
    sd = clone_sd(mim)
    path = tmp_path_factory.mktemp('pt') / 'checkpoint-9.pth'
    save_atomic({'format': 'mcbeit-pretrain-v1', 'model': sd, 'optimizer': {}, 'epoch': 9,
                 'args': {'model': 'beit_tiny_patch16_224_8k_vocab', 'lr': 1.5e-3}}, path)
    return str(path), sd


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fine-tuned-style classifier (10 classes, mean pooling, per-block tables) and its state dict."""
    model = randomized(classifier(seed=3), 4)
    return model, clone_sd(model)


def reference_table(table, src_side, dst_side):
    """The original's interpolation written out independently: (src^2+3, heads) -> (dst^2+3, heads)."""
    n, half = src_side // 2, dst_side // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** n) / (1 - q) > half else (q, hi)
    pos = np.cumsum([q ** i for i in range(n)])  # 1, 1+q, 1+q+q^2, ...
    x = np.concatenate([-pos[::-1], [0.0], pos])
    t = np.arange(-half, half + 1, dtype=np.float64)
    cols = []
    for h in range(table.shape[1]):
        z = table[:-3, h].reshape(src_side, src_side).double().numpy()
        cols.append(RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)(t, t).T.reshape(-1))
    return torch.cat([torch.tensor(np.stack(cols, 1), dtype=torch.float32), table[-3:]])


# ---------------------------------------------------------------------- our pre-training checkpoints
def test_pretrain_checkpoint_at_224_copies_the_shared_table_into_every_block(pretrained):
    path, sd = pretrained
    model = classifier()
    head_before = model.head.weight.clone()
    report = load_for_finetuning(path, model)
    assert report.source == path and report.model_key == 'model'
    assert report.expanded_shared_rel_pos_bias and report.interpolated == []
    own = model.state_dict()
    for i in range(12):
        assert torch.equal(own[TABLE.format(i)], sd['rel_pos_bias.relative_position_bias_table'])
    for k in ('patch_embed.proj.weight', 'cls_token', 'blocks.11.mlp.fc2.weight', 'blocks.4.gamma_1'):
        assert torch.equal(own[k], sd[k])
    assert set(report.dropped) == {'mask_token', 'lm_head.weight', 'lm_head.bias', 'norm.weight', 'norm.bias'}
    assert 'fc_norm starts fresh' in report.dropped['norm.weight']
    assert sorted(report.fresh) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert torch.equal(model.head.weight, head_before)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_cls_pooling_keeps_the_pretraining_norm(pretrained):
    path, sd = pretrained
    model = classifier(use_mean_pooling=False)
    report = load_for_finetuning(path, model)
    assert torch.equal(model.norm.weight, sd['norm.weight']) and torch.equal(model.norm.bias, sd['norm.bias'])
    assert sorted(report.fresh) == ['head.bias', 'head.weight'] and 'norm.weight' not in report.dropped


def test_pretrain_checkpoint_at_384_interpolates_like_the_original(pretrained):
    path, sd = pretrained
    model = classifier(input_size=384)
    report = load_for_finetuning(path, model)
    shared = sd['rel_pos_bias.relative_position_bias_table']  # (27*27+3, 3)
    assert [k for k, _, _ in report.interpolated] == [TABLE.format(i) for i in range(12)]
    assert all(src == (732, 3) and dst == (2212, 3) for _, src, dst in report.interpolated)
    expected = reference_table(shared, 27, 47)
    for i in range(12):
        torch.testing.assert_close(model.state_dict()[TABLE.format(i)], expected, rtol=0, atol=1e-5)
    new = model.state_dict()[TABLE.format(0)]
    assert torch.equal(new[-3:], shared[-3:])  # the cls rows are kept as they are
    # offsets -1, 0, 1 are source grid points (x = ..., -1, 0, 1, 1+q, ...): the spline passes through them
    src, dst = shared[:-3].view(27, 27, 3), new[:-3].view(47, 47, 3)
    torch.testing.assert_close(dst[22:25, 22:25], src[12:15, 12:15], rtol=0, atol=1e-5)
    assert not torch.allclose(dst[:3, :3], src[:3, :3])  # the far offsets did move
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_source_grid_and_spline_reproduce_the_source_points():
    x, dx = relative_position_coords(27, 47)
    assert x.shape == (27,) and dx.shape == (47,)
    assert list(x[12:15]) == [-1.0, 0.0, 1.0] and list(dx[[0, 23, 46]]) == [-23.0, 0.0, 23.0]
    assert abs(x[-1] - 23) < 1e-4  # the geometric progression spans the target window
    assert np.all(np.diff(np.diff(x[13:])) > 0)  # spacing grows with the offset
    z = np.random.default_rng(0).standard_normal((27, 27))
    np.testing.assert_allclose(RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)(x, x).T, z, atol=1e-10)


def test_non_square_grid_is_not_implemented(pretrained):
    torch.manual_seed(0)
    model = timm.create_model('beit_tiny_patch16_224', num_classes=10, img_size=(224, 320))
    with pytest.raises(NotImplementedError, match='square'):
        load_for_finetuning(pretrained[0], model)


# ---------------------------------------------------------------------- released / foreign layouts
def test_released_layout_with_namespace_and_module_key(tmp_path, finetuned):
    _, sd = finetuned
    path = tmp_path / 'released.pth'
    torch.save({'module': {'module.' + k: v for k, v in sd.items()}, 'epoch': 99,
                'args': argparse.Namespace(model='beit_tiny_patch16_224', nb_classes=10)}, path)
    model = classifier(seed=5)
    report = load_for_finetuning(str(path), model)
    assert report.model_key == 'module' and report.fresh == [] and report.dropped == {}
    assert report.loaded == len(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_model_prefix(tmp_path, finetuned):
    _, sd = finetuned
    path = tmp_path / 'wrapped.pth'
    torch.save({'model': {**{'encoder.' + k: v for k, v in sd.items()}, 'decoder.w': torch.ones(2)}}, path)
    model = classifier(seed=5)
    report = load_for_finetuning(str(path), model, model_prefix='encoder.')
    assert report.dropped == {'decoder.w': "outside --model_prefix 'encoder.'"}
    assert torch.equal(model.blocks[2].attn.qkv.weight, sd['blocks.2.attn.qkv.weight'])
    with pytest.raises(StateDictMismatchError, match='unexpected .*: encoder.cls_token'):
        load_for_finetuning(str(path), classifier(seed=5))
    with pytest.raises(CheckpointError, match="no checkpoint key starts with it"):
        load_for_finetuning(str(path), classifier(seed=5), model_prefix='backbone.')


def test_deepspeed_folder(tmp_path, finetuned):
    _, sd = finetuned
    (tmp_path / 'ds' / 'global_step7').mkdir(parents=True)
    (tmp_path / 'ds' / 'latest').write_text('global_step7\n')
    ds_file = tmp_path / 'ds' / 'global_step7' / 'mp_rank_00_model_states.pt'
    torch.save({'module': sd, 'buffer_names': [], 'ds_version': '0.14.0', 'global_steps': 7}, ds_file)
    model = classifier(seed=5)
    report = load_for_finetuning(str(tmp_path / 'ds'), model)
    assert report.source == str(ds_file) and report.model_key == 'module'
    assert torch.equal(model.head.weight, sd['head.weight'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointNotFoundError, match='not a DeepSpeed checkpoint'):
        load_for_finetuning(str(tmp_path / 'empty'), model)


@pytest.fixture(scope="module")
def timm_1000_classes():
    model = randomized(classifier(seed=6, nb_classes=1000), 7)
    return clone_sd(model)


@pytest.mark.parametrize('suffix', ['.bin', '.safetensors'])
def test_flat_timm_state_dict_with_another_head(tmp_path, timm_1000_classes, suffix):
    sd = timm_1000_classes
    path = str(tmp_path / ('timm' + suffix))
    if suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    model = classifier(seed=5)
    head_before = model.head.weight.clone()
    report = load_for_finetuning(path, model)
    assert report.model_key is None
    assert set(report.dropped) == {'head.weight', 'head.bias'} and '(1000, 192)' in report.dropped['head.weight']
    assert report.fresh == ['head.weight', 'head.bias']
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.fc_norm.weight, sd['fc_norm.weight'])
    assert torch.equal(model.blocks[5].attn.relative_position_bias_table, sd[TABLE.format(5)])


def test_broken_safetensors_file(tmp_path):
    path = tmp_path / 'broken.safetensors'
    path.write_bytes(b'not a safetensors file')
    with pytest.raises(CheckpointError, match='safetensors'):
        load_for_finetuning(str(path), classifier())


# ---------------------------------------------------------------------- URLs (no network)
def test_url_uses_the_hub_cache_or_says_where_to_put_the_file(tmp_path, monkeypatch, finetuned):
    _, sd = finetuned
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    torch.save({'model': sd}, cache / 'beit_tiny_ft.pth')

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    model = classifier(seed=5)
    report = load_for_finetuning('https://example.invalid/weights/beit_tiny_ft.pth', model)
    assert report.source == str(cache / 'beit_tiny_ft.pth')
    assert torch.equal(model.cls_token, sd['cls_token'])

    with pytest.raises(CheckpointError) as err:
        load_for_finetuning('https://example.invalid/weights/other.pth', model)
    assert str(cache / 'other.pth') in str(err.value) and 'no network' in str(err.value)

    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copy(cache / 'beit_tiny_ft.pth', dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    report = load_for_finetuning('https://example.invalid/w/beit-abc123.pth', classifier(seed=5))
    assert calls == [('https://example.invalid/w/beit-abc123.pth', 'abc123')]
    assert report.source == str(cache / 'beit-abc123.pth')


# ---------------------------------------------------------------------- absolute position embedding
def test_pos_embed_is_resized_bicubically(tmp_path, pretrained):
    src = randomized(classifier(seed=8, abs_pos_emb=True, rel_pos_bias=False), 9)
    path = tmp_path / 'abs.pth'
    torch.save({'model': src.state_dict()}, path)
    model = classifier(seed=5, input_size=384, abs_pos_emb=True, rel_pos_bias=False)
    report = load_for_finetuning(str(path), model)
    assert report.interpolated == [('pos_embed', (1, 197, 192), (1, 577, 192))]
    grid = src.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)  # (1,D,14,14)
    expected = F.interpolate(grid, size=(24, 24), mode='bicubic', align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 576, 192)
    assert torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])
    torch.testing.assert_close(model.pos_embed[:, 1:], expected, rtol=0, atol=1e-6)

    # the relative-only pre-training checkpoint has no pos_embed: it starts from the model's init
    model = classifier(seed=5, abs_pos_emb=True)
    before = model.pos_embed.clone()
    report = load_for_finetuning(pretrained[0], model)
    assert 'pos_embed' in report.fresh and torch.equal(model.pos_embed, before)

    # an absolute embedding the model has no place for is an error with a hint
    with pytest.raises(StateDictMismatchError, match='(?s)unexpected .*: pos_embed.*--abs_pos_emb'):
        load_for_finetuning(str(path), classifier(seed=5, rel_pos_bias=False))


# ---------------------------------------------------------------------- errors
def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / 'pwned'

    class Hostile:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / 'hostile.pth'
    torch.save({'model': {'cls_token': torch.zeros(1)}, 'args': Hostile()}, path)
    with pytest.raises(UnsafeCheckpointError, match='mkdir'):
        load_for_finetuning(str(path), classifier())
    assert not marker.exists()


def test_checkpoint_of_another_size_names_keys_and_shapes(tmp_path):
    small = classifier(seed=0, name='beit_small_patch16_224')
    path = tmp_path / 'small.pth'
    torch.save({'model': small.state_dict()}, path)
    model = classifier(seed=5)
    before = clone_sd(model)
    with pytest.raises(StateDictMismatchError) as err:
        load_for_finetuning(str(path), model)
    msg = str(err.value)
    assert 'patch_embed.proj.weight: checkpoint (384, 3, 16, 16) vs model (192, 3, 16, 16)' in msg
    assert f'{TABLE.format(0)}: checkpoint (732, 6) vs model (732, 3)' in msg
    assert '--model' in msg and 'beit_small_patch16_224' in msg
    assert ('cls_token', (1, 1, 384), (1, 1, 192)) in err.value.report.mismatched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left unchanged


def test_missing_path_says_so(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match='nowhere.pth.* does not exist'):
        load_for_finetuning(str(tmp_path / 'nowhere.pth'), classifier())
