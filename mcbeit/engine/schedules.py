"""Learning-rate / weight-decay schedules per step and the mc-BEiT temperature schedule per epoch."""
from __future__ import annotations

import numpy as np
import torch


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
    warmup_steps: int = -1,
) -> np.ndarray:
    """Per-step values: linear warm-up to ``base_value``, then a cosine down towards ``final_value``.

    Same values as the original BEiT ``utils.cosine_scheduler``: ``warmup_steps > 0`` overrides
    ``warmup_epochs * niter_per_ep``; step ``i`` of the ``n`` cosine steps is
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` (so the last step is just above
    ``final_value``). Unlike the original, ``warmup_steps`` is honoured when ``warmup_epochs == 0``
    (the original then built a schedule of the wrong length).
    """
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    if total < 0 or warmup_iters < 0:
        raise ValueError(f"epochs, niter_per_ep and warm-up must be non-negative "
                         f"(epochs={epochs}, niter_per_ep={niter_per_ep}, warm-up steps={warmup_iters})")
    if warmup_iters > total:
        raise ValueError(f"warm-up of {warmup_iters} steps is longer than the run "
                         f"({epochs} epochs x {niter_per_ep} steps = {total}): shorten --warmup_epochs / --warmup_steps")

    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n_cos = total - warmup_iters
    steps = np.arange(n_cos)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cos, 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def poly_scheduler(base_value: float, total_iters: int, power: float = 1.0, min_value: float = 0.0,
                   warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> np.ndarray:
    """Per-iteration values of mmcv's ``poly`` policy with ``warmup='linear'`` (mmseg's schedule).

    Iteration ``t`` (0-based, the update about to be made) gets ``regular = (base - min) * (1 - t / total) ** power
    + min``; during the warm-up (``t < warmup_iters``) that value times ``1 - (1 - t / warmup_iters) * (1 -
    warmup_ratio)``: the warm-up multiplies the already decayed poly value and starts at ``base * warmup_ratio``,
    as mmcv 1.3's ``PolyLrUpdaterHook`` + ``get_warmup_lr`` compute it (not a warm-up to ``base`` followed by poly).
    """
    if total_iters < 0 or warmup_iters < 0:
        raise ValueError(f"total_iters and warmup_iters must be non-negative, got {total_iters} and {warmup_iters}")
    t = np.arange(total_iters, dtype=np.float64)
    regular = (base_value - min_value) * (1.0 - t / max(total_iters, 1)) ** power + min_value
    if warmup_iters > 0:
        warm = t < warmup_iters
        regular[warm] *= 1.0 - (1.0 - t[warm] / warmup_iters) * (1.0 - warmup_ratio)
    return regular


def warmup_cosine_multiplier(total_iters: int, warmup_length: float = 0.01, warmup_factor: float = 0.001,
                             start: float = 1.0, end: float = 0.0) -> np.ndarray:
    """Per-iteration lr multipliers of detectron2's ``WarmupParamScheduler(CosineParamScheduler(start, end),
    warmup_factor, warmup_length)`` read through ``LRMultiplier`` (the detection recipes' schedule).

    Iteration ``t`` (0-based, the update about to be made) is at ``where = t / total_iters``. While ``where`` lies
    within ``warmup_length`` (fvcore's composite scheduler, with its 1e-6 tolerance), the value goes linearly from
    ``warmup_factor x cos(0)`` to ``cos(warmup_length)`` over the rescaled warm-up; after it, the cosine at the
    absolute ``where``: ``end + (start - end) (1 + cos(pi where)) / 2``.
    """
    if total_iters < 0 or not 0.0 <= warmup_length <= 1.0:
        raise ValueError(f"total_iters must be non-negative and warmup_length in [0, 1], got {total_iters} and "
                         f"{warmup_length}")
    where = np.arange(total_iters, dtype=np.float64) / max(total_iters, 1)

    def cosine(w):
        return end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * w))

    values = cosine(where)
    if warmup_length > 0:
        warm = where + 1e-6 <= warmup_length  # fvcore: the next segment once where + eps exceeds the length
        low, high = warmup_factor * cosine(0.0), cosine(warmup_length)
        alpha = where[warm] / warmup_length
        values[warm] = high * alpha + low * (1.0 - alpha)
    return values


def temperature_schedule(temp_warmup: float, temp: float, epochs: int, warmup_epochs: int = 30) -> np.ndarray:
    """Tokenizer-softmax temperature per ABSOLUTE epoch: ``linspace(temp_warmup, temp, warmup_epochs)``
    over the first ``warmup_epochs`` epochs, then ``temp``.

    Index it with the absolute epoch, so a resumed run continues the warm-up where it stopped (the
    original rebuilt and restarted it on resume). Runs shorter than the warm-up get its first
    ``epochs`` values (the original crashed for ``epochs < 30``).
    """
    if epochs < 0 or warmup_epochs < 0:
        raise ValueError(f"epochs and warmup_epochs must be non-negative, got {epochs} and {warmup_epochs}")
    schedule = np.full(epochs, float(temp), dtype=np.float64)
    ramp = np.linspace(temp_warmup, temp, warmup_epochs)
    n = min(epochs, warmup_epochs)
    schedule[:n] = ramp[:n]
    return schedule


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float | None, wd: float | None) -> None:
    """Set this step's values: ``lr * lr_scale`` in every group; ``wd`` in groups whose decay is > 0.

    The weight-decay rule is the original's, so a decay group set to 0 once stays at 0.
    """
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if wd is not None and group["weight_decay"] > 0:
            group["weight_decay"] = float(wd)


def lr_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Largest and smallest group lr (layer decay spreads them) and the decayed groups' weight decay."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    wds = [g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0]
    return {"lr": max(lrs), "min_lr": min(lrs), "weight_decay": wds[-1] if wds else 0.0}
