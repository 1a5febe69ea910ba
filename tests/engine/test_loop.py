"""One real pre-training step through mcbeit.engine.loop.pretrain_step."""
import numpy as np
import pytest
import timm
import torch

import mcbeit.models  # noqa: F401
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.loop import PretrainState, pretrain_step
from mcbeit.engine.optim import build_optimizer
from mcbeit.objectives import build_objective
from mcbeit.tokenizers import build_tokenizer


def _state(hard: bool, amp=None, detach=False, clip=None):
    torch.manual_seed(0)
    tok = build_tokenizer("customized", None, 32)
    model = timm.create_model("beit_tiny_patch16_224_8k_vocab", img_size=64, vocab_size=tok.vocab_size,
                              use_shared_rel_pos_bias=True, init_values=0.1)
    opt = build_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    return PretrainState(model=model, model_without_ddp=model, tokenizer=tok,
                         objective=build_objective(hard, 0.2, detach), optimizer=opt, scaler=None,
                         lr_schedule=np.full(4, 1e-3), wd_schedule=np.full(4, 0.05), dist=DistInfo(),
                         amp_dtype=amp, clip_grad=clip, params=list(model.parameters()))


def _batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, 3:5] = True
    mask[2, [0, 15]] = True  # ragged counts per image
    return torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, mask


@pytest.mark.parametrize("hard, amp, detach", [(False, None, False), (True, None, False), (False, torch.bfloat16, True)])
def test_step_updates_weights_with_inference_mode_tokenizer(hard, amp, detach):
    state = _state(hard, amp, detach)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    metrics = pretrain_step(state, _batch(), temp=4.0)
    stepped = metrics.pop("stepped")
    assert isinstance(stepped, torch.Tensor) and bool(stepped)   # fused AdamW decides on the device: no host read
    assert set(metrics) == {"loss", "mlm_acc", "grad_norm", "loss_scale"}
    assert torch.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert all(not t.is_inference() for t in metrics.values())
    changed = [k for k, v in state.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "mask_token" in changed and "lm_head.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    assert all(not p.requires_grad for p in state.tokenizer.parameters())


def test_clip_grad_bounds_the_update_and_reports_the_unclipped_norm():
    free, clipped = _state(False), _state(False, clip=1e-3)
    m_free = pretrain_step(free, _batch(), temp=4.0)
    m_clip = pretrain_step(clipped, _batch(), temp=4.0)
    assert m_clip["grad_norm"] == pytest.approx(m_free["grad_norm"].item(), rel=1e-5)  # norm before clipping
    grads = [p.grad for p in clipped.params if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads) <= 1e-3 * 1.001


def test_a_non_finite_gradient_is_skipped_and_leaves_weights_and_optimizer_untouched():
    state = _state(False, None, False)
    pretrain_step(state, _batch(), temp=4.0)                     # a good step: AdamW state exists
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer.state_dict()["state"][0].items()}
    with torch.no_grad():
        state.model.lm_head.weight[0, 0] = float("inf")           # the next loss and gradients are not finite
    poisoned = state.model.lm_head.weight.clone()
    metrics = pretrain_step(state, _batch(), temp=4.0)
    assert not bool(metrics["stepped"]) and not torch.isfinite(metrics["grad_norm"])
    assert torch.equal(state.model.lm_head.weight, poisoned)      # no update applied on top
    assert all(torch.equal(v, weights[k]) for k, v in state.model.state_dict().items() if k != "lm_head.weight")
    after = state.optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # moments and step count unchanged


def test_the_tokenizer_runs_fp32_where_the_cpu_only_emulates_bf16():
    """--amp bf16: the ViT computes in bf16 everywhere; the frozen tokenizer only where bf16 is native
    (GPUs; CPUs with AVX-512-BF16 / AMX), fp32 on others, where oneDNN's emulation is ~7x slower."""
    from mcbeit.engine.loop import native_low_precision, tokenizer_amp_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert native_low_precision(gpu, torch.bfloat16) and tokenizer_amp_dtype(gpu, torch.bfloat16) is torch.bfloat16
    assert tokenizer_amp_dtype(cpu, torch.bfloat16) is (torch.bfloat16 if native else None)
    assert tokenizer_amp_dtype(cpu, None) is None
    state = _state(False, torch.bfloat16)
    seen = {}
    conv = next(m for m in state.tokenizer.modules() if any(p.dim() == 4 for p in m.parameters(recurse=False)))
    conv.register_forward_hook(lambda m, i, o: seen.update(tokenizer=o.dtype) and None)
    state.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.update(vit=o.dtype) and None)
    pretrain_step(state, _batch(), temp=4.0)
    assert seen == {"tokenizer": torch.bfloat16 if native else torch.float32, "vit": torch.bfloat16}
