"""One real pre-training update through the engine (mcbeit.engine.loop.run_update): the mc-BEiT /
BEiT method's step, backward, clipping and the fused optimizer step."""
import pytest
import torch

import mcbeit.models  # noqa: F401
from mcbeit.config import resolve
from mcbeit.config.pretrain import PretrainConfig
from mcbeit.engine.loop import run_update
from mcbeit.engine.precision import Precision
from mcbeit.engine.trainer import Trainer
from mcbeit.tasks.pretrain import PretrainTask


def _run(hard: bool, amp=None, detach=False, clip=None):
    flags = {"model": "beit_tiny_patch16_224_8k_vocab", "input_size": 64, "second_input_size": 32,
             "num_mask_patches": 6, "min_mask_patches_per_block": 2, "lr": 1e-3, "weight_decay": 0.05,
             "hard_targets": hard, "detach_similarity": detach, "clip_grad": clip, "output_dir": "",
             "device": "cpu", "amp": {None: "off", torch.bfloat16: "bf16"}[amp]}
    config = resolve(PretrainConfig, flags)
    run = Trainer(config, PretrainTask(config)).ready(steps_per_epoch=4)
    assert run.precision == Precision(torch.device("cpu"), amp)
    return run


def _batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, 3:5] = True
    mask[2, [0, 15]] = True  # ragged counts per image
    return torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, mask


def step(run):
    return run_update(run, [_batch()])


@pytest.mark.parametrize("hard, amp, detach", [(False, None, False), (True, None, False), (False, torch.bfloat16, True)])
def test_step_updates_weights_with_inference_mode_tokenizer(hard, amp, detach):
    run = _run(hard, amp, detach)
    model = run.task.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = step(run)
    stepped = metrics.pop("stepped")
    assert isinstance(stepped, torch.Tensor) and bool(stepped)   # fused AdamW decides on the device: no host read
    assert {metrics.pop("images"), metrics.pop("skipped")} == {3, 0}
    assert set(metrics) == {"loss", "mlm_acc", "grad_norm", "loss_scale"}
    assert torch.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert all(not t.is_inference() for t in metrics.values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "mask_token" in changed and "lm_head.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    assert all(not p.requires_grad for p in run.task.method.tokenizer.parameters())


def test_clip_grad_bounds_the_update_and_reports_the_unclipped_norm():
    free, clipped = _run(False), _run(False, clip=1e-3)
    m_free = step(free)
    m_clip = step(clipped)
    assert m_clip["grad_norm"] == pytest.approx(m_free["grad_norm"].item(), rel=1e-5)  # norm before clipping
    grads = [p.grad for p in clipped.strategy.params if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads) <= 1e-3 * 1.001


def test_a_non_finite_gradient_is_skipped_and_leaves_weights_and_optimizer_untouched():
    run = _run(False, None, False)
    model, optimizer = run.task.model, run.strategy.optimizer
    step(run)                                                     # a good step: AdamW state exists
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")                 # the next loss and gradients are not finite
    poisoned = model.lm_head.weight.clone()
    metrics = step(run)
    assert not bool(metrics["stepped"]) and not torch.isfinite(metrics["grad_norm"])
    assert torch.equal(model.lm_head.weight, poisoned)            # no update applied on top
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k != "lm_head.weight")
    after = optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # moments and step count unchanged


def test_the_tokenizer_runs_fp32_where_the_cpu_only_emulates_bf16():
    """--amp bf16: the ViT computes in bf16 everywhere; the frozen tokenizer only where bf16 is native
    (GPUs; CPUs with AVX-512-BF16 / AMX), fp32 on others, where oneDNN's emulation is ~7x slower."""
    from mcbeit.engine.precision import native_low_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert native_low_precision(gpu, torch.bfloat16) and Precision(gpu, torch.bfloat16).target_dtype is torch.bfloat16
    assert Precision(cpu, torch.bfloat16).target_dtype is (torch.bfloat16 if native else None)
    assert Precision(cpu, None).target_dtype is None
    run = _run(False, torch.bfloat16)
    seen = {}
    tokenizer = run.task.method.tokenizer
    conv = next(m for m in tokenizer.modules() if any(p.dim() == 4 for p in m.parameters(recurse=False)))
    conv.register_forward_hook(lambda m, i, o: seen.update(tokenizer=o.dtype) and None)
    run.task.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.update(vit=o.dtype) and None)
    step(run)
    assert seen == {"tokenizer": torch.bfloat16 if native else torch.float32, "vit": torch.bfloat16}
