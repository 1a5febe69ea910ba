"""How much of each transformer block's activations is kept for the backward pass.

``--recompute`` chooses, for the BEiT blocks of any model (pre-training or classification):

* ``selective`` (pre-training's default): keep the outputs of every matrix product (``mm``/``addmm``/``bmm``:
  qkv, the attention scores and their product with v, proj, fc1, fc2) and of fused attention
  kernels; recompute the element-wise work in backward: layer norms, GELU, softmax, layer scale,
  residual adds. This drops the B x N x 4D GELU output and the layer norms' outputs of every
  block: ViT-B at batch 8 keeps 812 MB of activations instead of 1199 MB, for +2.7% of the
  forward + backward time on a 2-core CPU (`python -m mcbeit.bench`; not yet measured on a GPU, where
  element-wise work is a larger share of the step: try ``none`` there when memory allows).
* ``full``: timm's gradient checkpointing (only each block's input is kept; the whole block
  runs again in backward): the least memory, one more forward's worth of compute.
* ``none`` (fine-tuning's default): autograd keeps everything (the original code's behaviour),
  the fastest.

Built on PyTorch's selective activation checkpointing (``torch.utils.checkpoint`` with
``create_selective_checkpoint_contexts``); random ops (drop path) replay the same draws.
The state dict is unchanged: blocks keep their class's parameters, only their ``forward`` differs.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Block
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["RECOMPUTE_MODES", "DEFAULT_RECOMPUTE", "FINETUNE_RECOMPUTE", "set_recompute", "recompute_mode"]

RECOMPUTE_MODES = ("selective", "full", "none")
DEFAULT_RECOMPUTE = "selective"  # pre-training: a third less activation memory for ~3% of the step
FINETUNE_RECOMPUTE = "none"      # fine-tuning: nothing else to save there, so the fastest

_aten = torch.ops.aten
# Outputs kept from the forward pass: matrix products (recomputing the attention's two batched
# products as well saved another 226 MB for ViT-B but cost +6% instead of +2.7%) and fused
# attention kernels (their saved outputs are small: the result and the log-sum-exp).
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}
for _name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
    if hasattr(_aten, _name):
        _KEEP.add(getattr(_aten, _name).default)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


_context = functools.partial(create_selective_checkpoint_contexts, _policy)


class SelectiveRecomputeBlock(Block):
    """timm's BEiT ``Block`` whose training forward keeps only the matrix products' outputs."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x, shared_rel_pos_bias)
        return checkpoint(super().forward, x, shared_rel_pos_bias, use_reentrant=False, context_fn=_context)


def set_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Switch every BEiT block of ``model`` to ``mode`` (one of :data:`RECOMPUTE_MODES`); returns it."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"--recompute {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    for module in model.modules():
        if type(module) in (Block, SelectiveRecomputeBlock):  # never replace another subclass's forward
            module.__class__ = SelectiveRecomputeBlock if mode == "selective" else Block
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(mode == "full")
    return model


def recompute_mode(model: nn.Module) -> str:
    """The mode ``model``'s blocks are in (``none`` for a model without BEiT blocks)."""
    if getattr(model, "grad_checkpointing", False):
        return "full"
    if any(isinstance(m, SelectiveRecomputeBlock) for m in model.modules()):
        return "selective"
    return "none"
