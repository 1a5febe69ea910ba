"""StepMeter: per-step device metrics read back once per interval, epoch means, non-finite losses stop the run."""
import struct

import pytest
import torch

from mcbeit.engine.logging import RunWriter
from mcbeit.engine.meter import DivergenceError, NonFiniteLossError, StepMeter


def read_scalars(folder):
    """{tag: [(step, value), ...]} from the TFRecord event files tensorboardX wrote (length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            n = struct.unpack("<Q", data[pos:pos + 8])[0]
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _meter(writer=None, last=None, max_bad_steps=20):
    return StepMeter(("loss", "acc"), ("loss", "acc"), {"loss": ("loss", "acc"), "opt": ("lr",)},
                     {"loss": ("loss", "{:.3f}")}, epoch=2, first_step=10, total_steps=4, writer=writer, show=False,
                     last_good_checkpoint=last, stop_hint="Lower --lr.", max_bad_steps=max_bad_steps)


def test_means_totals_and_one_tensorboard_point_per_step(tmp_path):
    writer = RunWriter(str(tmp_path), str(tmp_path / "tb"), enabled=True)
    meter = _meter(writer)
    for i in range(4):
        meter.add({"loss": torch.tensor(float(i)), "acc": torch.tensor(0.5)}, {"lr": 0.1 * i}, images=8,
                  skipped=torch.tensor(i % 2))
        if meter.steps % 3 == 0:
            meter.flush()
    assert meter.steps == 4 and meter.totals["loss"] == 3.0                 # steps 0..2 flushed, step 3 pending
    stats = meter.epoch_stats()
    seconds, speed = stats.pop("time_s"), stats.pop("images_per_s")
    assert stats == pytest.approx({"loss": 1.5, "acc": 0.5, "lr": 0.15, "steps": 4, "skipped_images": 2,
                                   "skipped_steps": 0, "images": 32})
    assert seconds > 0 and speed == pytest.approx(32 / seconds)
    writer.close()
    scalars = read_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["loss/loss"]] == [10, 11, 12, 13]      # global steps from first_step
    assert [round(v, 6) for _, v in scalars["opt/lr"]] == [0.0, 0.1, 0.2, 0.3]


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint():
    meter = _meter(last="/runs/a/checkpoint-1.pth")
    meter.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.0)}, {"lr": 0.1}, images=8)
    meter.add({"loss": torch.tensor(float("nan")), "acc": torch.tensor(0.0)}, {"lr": 0.1}, images=8)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 11.*checkpoint-1\.pth.*Lower --lr"):
        meter.flush()


def test_an_epoch_without_steps_says_what_to_do():
    with pytest.raises(RuntimeError, match="lower --batch_size"):
        _meter().epoch_stats()


def test_skipped_steps_are_counted_left_out_of_the_means_and_stop_the_run_when_consecutive():
    meter = _meter(last="/runs/a/checkpoint-1.pth", max_bad_steps=3)
    nan = torch.tensor(float("nan"))
    for loss, ok in ((1.0, True), (nan, False), (3.0, True), (nan, False), (nan, False)):
        meter.add({"loss": torch.as_tensor(loss), "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8, stepped=ok)
    stats = meter.epoch_stats()
    assert stats["loss"] == 2.0 and stats["steps"] == 5 and stats["skipped_steps"] == 3  # mean of the applied two
    meter = _meter(last="/runs/a/checkpoint-1.pth", max_bad_steps=3)
    meter.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8)
    for _ in range(2):
        meter.add({"loss": nan, "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8, stepped=False)
    with pytest.raises(DivergenceError, match=r"3 consecutive steps .*step 13.*checkpoint-1\.pth.*Lower --lr"):
        meter.add({"loss": nan, "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8, stepped=False)


def test_device_flags_from_the_fused_optimizer_are_read_and_counted_at_the_flush():
    """``stepped`` as a device bool tensor (fused AdamW's own skip): nothing is read per step; the
    flush counts the skips in order, leaves them out of the means, and stops a long enough run."""
    meter = _meter(last="/runs/a/checkpoint-1.pth", max_bad_steps=3)
    nan = torch.tensor(float("nan"))
    for loss, ok in ((1.0, True), (nan, False), (3.0, True), (nan, False), (nan, False)):
        meter.add({"loss": torch.as_tensor(loss), "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8,
                  stepped=torch.tensor(ok))
    assert meter.bad_steps == 0                                   # not read yet
    stats = meter.epoch_stats()
    assert stats["loss"] == 2.0 and stats["skipped_steps"] == 3 and meter.consecutive_bad == 2
    meter = _meter(last="/runs/a/checkpoint-1.pth", max_bad_steps=3)
    meter.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8, stepped=torch.tensor(True))
    for _ in range(3):
        meter.add({"loss": nan, "acc": torch.tensor(0.5)}, {"lr": 0.1}, images=8, stepped=torch.tensor(False))
    with pytest.raises(DivergenceError, match=r"3 consecutive steps .*step 13.*checkpoint-1\.pth.*Lower --lr"):
        meter.flush()


def test_unreadable_images_stop_the_epoch_as_soon_as_its_allowance_is_certainly_exceeded():
    """--max_bad_fraction is checked at every flush against the WHOLE epoch: 100 steps of 10 images
    with 5% allowed may skip about 52 files. 30 skipped in the first 10 steps (23% so far) is within
    it and goes on; 60 by step 20 can never come back under it and stops there, not at step 100."""
    from mcbeit.engine.bad_data import TooManyBadImagesError

    def meter():
        return StepMeter(("loss",), (), {}, {}, epoch=1, first_step=0, total_steps=100, writer=None, show=False,
                         last_good_checkpoint=None, stop_hint="", max_bad_fraction=0.05)

    def steps(m, n, skipped_each):
        for _ in range(n):
            m.add({"loss": torch.tensor(1.0)}, {}, images=10, skipped=skipped_each)
        m.flush()

    within = meter()
    steps(within, 10, 3)                           # 30 skipped, 100 delivered: 23% so far
    steps(within, 90, 0)
    assert within.epoch_stats()["skipped_images"] == 30   # 30 / 1030 = 2.9% <= 5% at the end

    beyond = meter()
    steps(beyond, 10, 3)
    with pytest.raises(TooManyBadImagesError, match=r"60 of 260 images in epoch 1 so far \(step 20 of 100: already more than"):
        steps(beyond, 10, 3)                       # 60 skipped: 60 / (60 + 1000) > 5% whatever comes next
    assert beyond.steps == 20
