"""Per-step cosine schedule (the original's values), temperature schedule, applying them."""
import math

import numpy as np
import pytest
import torch

from mcbeit.engine.schedules import apply_schedules, cosine_scheduler, temperature_schedule, warmup_cosine_multiplier


def original_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0, warmup_steps=-1):
    """The original BEiT utils.cosine_scheduler (for the cases where it is right)."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_steps > 0:
        warmup_iters = warmup_steps
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / (len(iters)))) for i in iters])
    return np.concatenate((warmup_schedule, schedule))


def test_length_warmup_endpoints_and_cosine_end():
    s = cosine_scheduler(1.5e-3, 1e-5, epochs=10, niter_per_ep=7, warmup_epochs=2, start_warmup_value=1e-6)
    assert s.shape == (70,)
    assert s[0] == pytest.approx(1e-6)
    assert s[13] == pytest.approx(1.5e-3)  # last warm-up step is the base value
    assert s[14] == pytest.approx(1.5e-3)  # first cosine step too
    n = 70 - 14
    assert s[-1] == pytest.approx(1e-5 + 0.5 * (1.5e-3 - 1e-5) * (1 + math.cos(math.pi * (n - 1) / n)), abs=1e-6)
    assert abs(s[-1] - 1e-5) < 1e-5
    assert np.all(np.diff(s[14:]) <= 0)
    np.testing.assert_allclose(s, original_cosine(1.5e-3, 1e-5, 10, 7, 2, 1e-6), rtol=0, atol=1e-12)


def test_matches_original_without_warmup_and_with_warmup_steps():
    np.testing.assert_allclose(cosine_scheduler(0.05, 0.05, 3, 5), np.full(15, 0.05), atol=1e-15)
    np.testing.assert_allclose(cosine_scheduler(0.05, 0.2, 3, 5), original_cosine(0.05, 0.2, 3, 5), atol=1e-12)
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 4, 5, warmup_epochs=1, warmup_steps=3),
                               original_cosine(1.0, 0.0, 4, 5, 1, 0.0, 3), atol=1e-12)


def test_warmup_steps_without_warmup_epochs():
    s = cosine_scheduler(1.0, 0.1, epochs=2, niter_per_ep=10, warmup_epochs=0, warmup_steps=4)
    assert s.shape == (20,)  # the original returned 16 values here
    np.testing.assert_allclose(s[:4], np.linspace(0.0, 1.0, 4))
    assert s[4] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16)))


def test_warmup_longer_than_the_run_is_an_error():
    with pytest.raises(ValueError, match="longer than the run"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_epochs=3)
    with pytest.raises(ValueError, match="longer than the run"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_steps=11)
    assert cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_steps=10)[-1] == 1.0  # all warm-up


def test_temperature_schedule_full_and_short_runs():
    full = temperature_schedule(8.0, 4.0, epochs=100)
    assert full.shape == (100,)
    np.testing.assert_allclose(full[:30], np.linspace(8.0, 4.0, 30))
    assert np.all(full[29:] == 4.0)

    short = temperature_schedule(8.0, 4.0, epochs=10)  # the original crashed here
    assert short.shape == (10,)
    np.testing.assert_allclose(short, np.linspace(8.0, 4.0, 30)[:10])

    assert np.all(temperature_schedule(4.0, 4.0, epochs=5) == 4.0)  # the defaults: no warm-up


def test_temperature_schedule_resume_continues_the_warmup():
    epochs, start_epoch = 50, 12
    schedule = temperature_schedule(8.0, 4.0, epochs)
    resumed = [schedule[e] for e in range(start_epoch, epochs)]  # indexed by the absolute epoch
    assert resumed[0] == pytest.approx(np.linspace(8.0, 4.0, 30)[12])
    assert resumed[0] != 8.0


def test_apply_schedules_uses_lr_scale_and_only_touches_decayed_groups():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([
        {"params": [a], "weight_decay": 0.05, "lr_scale": 0.5},
        {"params": [b], "weight_decay": 0.0, "lr_scale": 1.0},
    ], lr=1.0)
    apply_schedules(opt, np.float64(1e-3), 0.02)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and opt.param_groups[0]["weight_decay"] == 0.02
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3) and opt.param_groups[1]["weight_decay"] == 0.0
    assert type(opt.param_groups[0]["lr"]) is float


def _mmcv_poly_with_linear_warmup(base, t, total, power, min_lr, warmup_iters, warmup_ratio):
    """Literal restatement of mmcv 1.3 lr_updater.py: PolyLrUpdaterHook.get_lr (L203-211) and, while
    t < warmup_iters, get_warmup_lr's 'linear' branch (L83-92) applied to that regular lr."""
    coeff = (1 - t / total) ** power
    regular = (base - min_lr) * coeff + min_lr
    if t < warmup_iters:
        k = (1 - t / warmup_iters) * (1 - warmup_ratio)
        return regular * (1 - k)
    return regular


def test_poly_schedule_is_mmcv_poly_with_its_linear_warmup():
    from mcbeit.engine.schedules import poly_scheduler

    values = poly_scheduler(8e-5, 160000, 1.0, 0.0, 1500, 1e-6)
    assert len(values) == 160000
    for t in (0, 1, 749, 1499, 1500, 1501, 80000, 159999):
        assert values[t] == pytest.approx(_mmcv_poly_with_linear_warmup(8e-5, t, 160000, 1.0, 0.0, 1500, 1e-6),
                                          rel=1e-12)
    assert values[0] == pytest.approx(8e-5 * 1e-6)                 # starts at base x warmup_ratio, not 0
    assert values[1499] == pytest.approx(0.98997 * 8e-5, rel=1e-4)  # the warm-up multiplies the decayed value
    assert values[1500] == pytest.approx(0.990625 * 8e-5, rel=1e-9)
    assert values[-1] == pytest.approx(8e-5 / 160000)
    other = poly_scheduler(1.0, 100, 0.9, 1e-4, 0)
    assert other[50] == pytest.approx(_mmcv_poly_with_linear_warmup(1.0, 50, 100, 0.9, 1e-4, 0, 1e-6))


def _fvcore_warmup_cosine(where: float, warmup_length: float, warmup_factor: float) -> float:
    """detectron2's WarmupParamScheduler(CosineParamScheduler(1, 0), factor, length) as fvcore's composite computes
    it, step by step: the warm-up segment rescaled, the cosine at the absolute position."""
    def cosine(w):
        return 0.0 + 0.5 * (1.0 - 0.0) * (1 + math.cos(math.pi * w))

    lengths, running = [warmup_length, 1 - warmup_length], warmup_length
    i = 0
    while where + 1e-6 > running and i < 1:
        i += 1
        running += lengths[i]
    if i == 0:
        start, end = warmup_factor * cosine(0.0), cosine(warmup_length)
        w = where / warmup_length
        return end * w + start * (1 - w)
    return cosine(where)


@pytest.mark.parametrize("total,length", [(46093, 0.01), (400, 0.01), (37, 0.25), (10, 0.0)])
def test_warmup_cosine_multiplier_is_detectron2s_warmup_param_scheduler(total, length):
    values = warmup_cosine_multiplier(total, length, 0.001)
    expected = [_fvcore_warmup_cosine(t / total, length, 0.001) if length else
                0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert values.shape == (total,)
    if length:
        assert values[0] == pytest.approx(0.001)  # the warm-up starts at the factor
        assert values.max() <= 1.0 and values[-1] < 2e-3  # ends near 0 (one step before the cosine reaches it)
