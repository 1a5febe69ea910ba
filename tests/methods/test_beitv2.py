"""BEiT v2's method: the loss against a literal restatement of unilm's forward + loss, one real update
through the engine, the views and masks it asks for."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import mcbeit.models  # noqa: F401
from mcbeit.config import resolve
from mcbeit.config.pretrain import BeitV2PretrainConfig
from mcbeit.data.masking import BlockMaskGenerator
from mcbeit.engine.loop import run_update
from mcbeit.engine.trainer import Trainer
from mcbeit.methods import METHODS
from mcbeit.methods.beitv2 import BeitV2Targets
from mcbeit.objectives import PatchAggregationLoss
from mcbeit.tasks.pretrain import PretrainTask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patch_aggregation_loss_is_the_originals():
    """unilm engine_for_pretraining.py: nn.CrossEntropyLoss() on outputs[0] and outputs[1] against the same
    labels, summed; accuracies (outputs[i].max(-1)[1] == labels).float().mean()."""
    g = torch.Generator().manual_seed(0)
    M, V = 23, 37
    outputs = [torch.randn(M, V, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    labels = torch.randint(0, V, (M,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    loss_1 = loss_fn(input=outputs[0], target=labels)
    loss_2 = loss_fn(input=outputs[1], target=labels)
    want = loss_1 + loss_2
    got = PatchAggregationLoss()(outputs[0], outputs[1], labels)
    torch.testing.assert_close(got["loss"], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["loss_1"], loss_1, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["loss_2"], loss_2, rtol=0, atol=1e-12)
    for i, name in enumerate(("mlm_acc_1", "mlm_acc_2")):
        assert got[name].item() == (outputs[i].max(-1)[1] == labels).float().mean().item()
    # the gradients are the original's too: each stream gets its own CE's
    g_want = torch.autograd.grad(want, outputs, retain_graph=True)
    g_got = torch.autograd.grad(got["loss"], outputs)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no masked patch"):
        PatchAggregationLoss()(outputs[0][:0], outputs[1][:0], labels[:0])


def _run(model="beit_tiny_patch16_224_8k_vocab_cls_pt", **flags):
    values = {"model": model, "input_size": 64, "second_input_size": 64, "num_mask_patches": 6,
              "min_mask_patches_per_block": 2, "drop_path": 0.0, "codebook_size": 64, "output_dir": "",
              "device": "cpu", "amp": "off", "early_layers": 9, **flags}
    config = resolve(BeitV2PretrainConfig, values)
    return Trainer(config, PretrainTask(config)).ready(steps_per_epoch=4)


def _batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, 3:9] = True
    mask[2, [0, 5, 6, 9, 10, 15]] = True
    return torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, mask


def test_step_is_the_originals_forward_and_loss():
    """Targets: the tokenizer's code ids of view B at the masked patches; loss: CE(main) + CE(aggregated)."""
    run = _run()
    method, model = run.task.method, run.task.model
    assert isinstance(method, BeitV2Targets) and METHODS["beitv2"] is BeitV2Targets
    view_a, view_b, mask = _batch()
    out = method.step((view_a, view_b, mask, torch.zeros(3)))
    # literal: labels = vqkd.get_codebook_indices(images)[bool_masked_pos]; outputs = model(samples, mask)
    with torch.no_grad():
        z = nn.functional.normalize(method.tokenizer.quantizer_input(view_b).float(), dim=-1)   # (B, N, c)
        codebook = method.tokenizer.quantize.codebook                                          # (V, c)
        input_ids = (z @ codebook.t()).argmax(-1)                                              # nearest by cosine
        labels = input_ids[mask]
        _, out_0, out_1 = model(view_a, mask)
        loss_fn = nn.CrossEntropyLoss()
        loss_1, loss_2 = loss_fn(out_0, labels), loss_fn(out_1, labels)
    assert len(set(labels.tolist())) > 1  # the targets are not one code
    torch.testing.assert_close(out.metrics["loss_1"], loss_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["loss_2"], loss_2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, loss_1 + loss_2, rtol=1e-5, atol=1e-6)
    assert out.metrics["mlm_acc_1"].item() == (out_0.argmax(-1) == labels).float().mean().item()
    assert set(out.metrics) == {"loss", "loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2"} and out.images == 3


def test_one_update_trains_both_streams_and_not_the_tokenizer():
    run = _run()
    model = run.task.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = run_update(run, [_batch()])
    assert {"loss", "loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2", "grad_norm"} <= set(metrics)
    assert torch.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"mask_token", "lm_head.weight", "cls_pt_layers.1.mlp.fc2.weight", "blocks.8.attn.qkv.weight",
            "blocks.11.attn.qkv.weight", "norm.weight"} <= changed
    assert all(not p.requires_grad for p in run.task.method.tokenizer.parameters())


def test_a_model_without_cls_pt_trains_one_cross_entropy():
    """As the original script: a model without cls_pt is BEiT's single loss on VQ-KD targets."""
    run = _run(model="beit_tiny_patch16_224_8k_vocab")
    assert run.task.meter.metrics[:2] == ("loss", "mlm_acc")
    out = run.task.method.step((*_batch(), torch.zeros(3)))
    assert set(out.metrics) == {"loss", "mlm_acc"} and torch.isfinite(out.loss)


def test_views_and_masks_are_v2s():
    run = _run(min_crop_scale=0.5)
    task = run.task
    data = task.build_data(run)
    transform = data.loader.dataset.transform
    assert "ColorJitter(0.4, 0.4, 0.4)" in repr(transform) and "scale=(0.5, 1.0)" in repr(transform)
    views = transform.views
    assert isinstance(views.mask_generator, BlockMaskGenerator) and views.mask_generator.exact
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    view_a, view_b, mask = transform(image, np.random.default_rng(1))
    assert view_a.shape == view_b.shape == (3, 64, 64) and int(mask.sum()) == 6
    assert view_b.min() >= -1 and view_b.max() <= 1  # [0, 1] mapped by the tokenizer's input transform
