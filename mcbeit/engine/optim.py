"""Optimizer parameter groups exactly as the original BEiT ``optim_factory``, built through timm.

Weight decay: a parameter gets none iff it is 1-D, a ``.bias``, in ``skip_list`` (the model's
``no_weight_decay()``: ``pos_embed`` and ``cls_token``) or its name contains one of
``extra_no_decay_keywords``. So ``mask_token``, ``lm_head.weight`` and the relative position
tables DO get decay, unlike timm's defaults.

Layer-wise lr decay (fine-tuning): layer 0 for ``cls_token``, ``mask_token``, ``pos_embed`` and
``patch_embed.*``; ``i + 1`` for ``blocks.i.*``; ``num_layers + 1`` for everything else,
including a shared ``rel_pos_bias`` (timm's ``group_matcher`` puts it with the stem at 0, which is
not what the original does). Each group carries ``lr_scale = layer_decay ** (num_layers + 1 - layer)``
(1.0 without layer decay), applied per step by :func:`mcbeit.engine.schedules.apply_schedules`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from timm.optim import create_optimizer_v2, list_optimizers

logger = logging.getLogger(__name__)

_LAYER0_NAMES = ("cls_token", "mask_token", "pos_embed")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the checkpoint's (strips DDP's ``module`` and torch.compile's ``_orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def num_layers_of(model: nn.Module) -> int:
    """Number of transformer blocks (``get_num_layers()`` when the model has it)."""
    model = unwrap_model(model)
    if hasattr(model, "get_num_layers"):
        return int(model.get_num_layers())
    if hasattr(model, "blocks"):
        return len(model.blocks)
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__}: pass num_layers")


def layer_id(name: str, num_layers: int) -> int:
    """Layer of a parameter for layer-wise lr decay, as the original ``get_num_layer_for_vit``."""
    if name in _LAYER0_NAMES or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1  # final norm, heads, shared rel_pos_bias


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip_list: Iterable[str] = (),
    layer_decay: float | None = None,
    num_layers: int | None = None,
    extra_no_decay_keywords: Sequence[str] = (),
    layer_prefix: str = "",
    no_decay_names: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups ``{'params', 'weight_decay', 'lr_scale'}``, keyed by (layer, decay / no decay).

    Frozen parameters (``requires_grad=False``) are left out. ``layer_prefix`` (e.g. ``'backbone.'`` for a
    segmentor): layer ids are read from the names under it with the prefix removed, and every other
    parameter (necks, heads) is in the top layer, ``num_layers + 1`` (mmseg's layer-decay constructor).
    ``no_decay_names``: the parameters without weight decay, replacing the rule above (detectron2's:
    :func:`detectron2_no_decay`).
    """
    model = unwrap_model(model)
    skip = set(skip_list)
    if layer_decay is not None and num_layers is None:
        num_layers = num_layers_of(model.get_submodule(layer_prefix.rstrip(".")) if layer_prefix else model)

    groups: dict[str, dict[str, Any]] = {}
    names: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = name in no_decay_names if no_decay_names is not None else (
            param.ndim == 1
            or name.endswith(".bias")
            or name in skip
            or any(keyword in name for keyword in extra_no_decay_keywords)
        )
        key = "no_decay" if no_decay else "decay"
        scale = 1.0
        if layer_decay is not None:
            if layer_prefix:
                layer = layer_id(name[len(layer_prefix):], num_layers) if name.startswith(layer_prefix) \
                    else num_layers + 1
            else:
                layer = layer_id(name, num_layers)
            key = f"layer_{layer}_{key}"
            scale = float(layer_decay ** (num_layers + 1 - layer))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else float(weight_decay), "lr_scale": scale}
            names[key] = []
        groups[key]["params"].append(param)
        names[key].append(name)

    if logger.isEnabledFor(logging.DEBUG):
        for key, group in groups.items():
            logger.debug("param group %s: weight_decay=%g lr_scale=%g %s",
                         key, group["weight_decay"], group["lr_scale"], names[key])
    return list(groups.values())


#: the module types whose parameters detectron2's ``get_default_optimizer_params`` gives ``weight_decay_norm``
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
               nn.modules.instancenorm._InstanceNorm)


def detectron2_no_decay(model: nn.Module, names: Iterable[str] = ("pos_embed", "relative_position_bias_table"),
                        ) -> set[str]:
    """The parameters that detectron2's ``get_default_optimizer_params(weight_decay_norm=0.0, overrides={name:
    {"weight_decay": 0.0} for name in names})`` exempts from weight decay: every parameter of a normalisation
    module, and those whose own name (the last part of the dotted name) is in ``names``. Biases of other modules,
    ``cls_token``, ``q_bias`` / ``v_bias`` and layer-scale gammas keep the weight decay there."""
    model = unwrap_model(model)
    exempt = set(names)
    out = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or param_name in exempt:
                out.add(f"{module_name}.{param_name}" if module_name else param_name)
    return out


def _original_skip_list(model: nn.Module) -> set[str]:
    """``model.no_weight_decay()`` without relative position tables.

    timm's ``Beit.no_weight_decay()`` also lists the relative position tables; the original BEiT
    decays them (fine-tuning's ``--disable_weight_decay_on_rel_pos_bias`` is how to exempt them).
    """
    names = getattr(model, "no_weight_decay", lambda: set())()
    return {n for n in names if "relative_position_bias_table" not in n}


def _check_optimizer_name(opt: str) -> None:
    name = opt.lower().split("_")[-1]  # timm's parsing: 'lookahead_adamw' -> 'adamw'
    known = list_optimizers()
    if name not in known:
        raise ValueError(
            f"unknown optimizer {opt!r} (timm: Optimizer {name} not found in registry). "
            f"Use one of timm's: {', '.join(known)} (optionally prefixed 'lookahead_')."
        )


def build_optimizer(
    model: nn.Module,
    opt: str = "adamw",
    *,
    lr: float,
    weight_decay: float,
    opt_eps: float | None = 1e-8,
    opt_betas: Sequence[float] | None = (0.9, 0.98),
    momentum: float = 0.9,
    layer_decay: float | None = None,
    extra_no_decay_keywords: Sequence[str] = (),
    num_layers: int | None = None,
    skip_list: Iterable[str] | None = None,
    layer_prefix: str = "",
    no_decay_names: Collection[str] | None = None,
) -> torch.optim.Optimizer:
    """Any optimizer timm knows, over :func:`param_groups` (every group keeps its ``lr_scale``).

    ``opt_eps`` / ``opt_betas`` set to None leave the optimizer's own defaults. AdamW uses PyTorch's
    fused kernel on CPU and CUDA (on the 2-core CPU 3.4x faster than the multi-tensor one for
    ViT-B, without its parameter-sized temporaries; it also skips a non-finite step on the device,
    see :func:`clip_and_step`), the multi-tensor (foreach) one elsewhere. ``skip_list``: the names without weight
    decay beyond 1-D parameters and biases (default: the model's ``no_weight_decay()`` less the relative tables);
    ``layer_prefix``, ``no_decay_names``: see :func:`param_groups`.
    """
    _check_optimizer_name(opt)
    model = unwrap_model(model)
    groups = param_groups(
        model,
        weight_decay,
        skip_list=_original_skip_list(model) if skip_list is None else skip_list,
        layer_decay=layer_decay,
        num_layers=num_layers,
        extra_no_decay_keywords=extra_no_decay_keywords,
        layer_prefix=layer_prefix,
        no_decay_names=no_decay_names,
    )
    kwargs: dict[str, Any] = {}
    if opt_eps is not None:
        kwargs["eps"] = opt_eps
    if opt_betas is not None:
        kwargs["betas"] = tuple(opt_betas)
    if opt.lower() == "adamw":
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        kwargs["fused" if fusable else "foreach"] = True
    # weight_decay=0 at the top level: every group carries its own.
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=0.0, momentum=momentum, **kwargs)


def grad_norm_of(params: Sequence[nn.Parameter], clip: float | None) -> torch.Tensor:
    """Total gradient norm (before clipping); clips to ``clip`` when it is > 0. A device tensor: no host sync."""
    if clip is not None and clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # only without parameters


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  params: Sequence[nn.Parameter], clip: float | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """After backward: unscale (fp16), clip, and step unless a gradient is not finite.

    Returns (grad_norm of the unscaled gradients, loss_scale) as device tensors and whether the
    optimizer stepped. A non-finite gradient never reaches the weights: with a fused optimizer
    (AdamW, see :func:`build_optimizer`) the kernel itself skips the update, step count included,
    when its ``found_inf`` flag is set, so nothing waits for the device and ``stepped`` is a device
    bool tensor the meter reads at its next flush; other optimizers are skipped here after one host
    read of the norm; with an fp16 scaler the scaler skips the step and lowers the scale, as usual.
    Under DDP every rank holds the same reduced gradients, so every rank decides the same.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = grad_norm_of(params, clip).detach().float()
    if scaler is None and optimizer.defaults.get("fused"):
        finite = torch.isfinite(norm)                       # () bool, on the device
        optimizer.found_inf = (~finite).float()            # read by the fused kernel, not by the host
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return norm, torch.ones((), device=norm.device), finite
    finite = bool(torch.isfinite(norm))
    if scaler is None:
        if finite:
            optimizer.step()
        return norm, torch.ones((), device=norm.device), finite
    scaler.step(optimizer)  # skips by itself when unscale_ found an inf / nan
    scaler.update()
    return norm, scaler._get_scale_async().detach().reshape(()).float(), finite


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      params: Sequence[nn.Parameter], clip: float | None,
                      mark: Callable[[str], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """zero_grad, backward (through the fp16 scaler when there is one), clip, step: one update per call.

    Returns :func:`clip_and_step`'s (grad_norm, loss_scale, stepped). ``mark(phase)`` (the benchmark's
    timer) is called after "backward" and after "optimizer".
    """
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if mark is not None:
        mark("backward")
    out = clip_and_step(optimizer, scaler, params, clip)
    if mark is not None:
        mark("optimizer")
    return out
