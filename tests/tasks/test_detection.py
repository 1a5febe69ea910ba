"""COCO detection end to end (mcbeit-det, the seed's lazyconfig_train_net.py): the embedded scenes through large-scale
jitter, training counted in iterations with evaluation rounds (the last one shorter, ending with the schedule),
checkpoints, COCO AP, visualisations, exact resume mid-round, and the seed's command line in two processes from a
pre-training checkpoint of ours, then its --eval-only."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mcbeit.cli import detection
from tests.engine.test_meter import read_scalars
from tests.tasks.conftest import REPO, cli_env, read_log
from tests.tasks.test_resume import _assert_same_state, _keep_when_written

pytestmark = pytest.mark.usefixtures("one_thread")

SEED_CONFIG = "configs/benchmarking/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit.py"
# a tiny Mask R-CNN at 64 px (4x4 patches, 2x2 windows): the seed's recipe otherwise
DET_FAST = ["--model", "beit_tiny_patch16_224", "--image_size", "64", "--window_size", "2", "--fpn_channels", "32",
            "--box_fc_dim", "64", "--anchor_sizes", "8", "16", "32", "64", "128", "--box_batch_size_per_image", "32",
            "--rpn_batch_size_per_image", "64", "--total_batch_size", "2", "--num_workers", "0", "--print_freq", "1",
            "--device", "cpu", "--vis_images", "2", "--lr", "1e-3", "--warmup_length", "0.25"]


def _train(out, *extra):
    return detection.run(detection.get_args_parser("train").parse_args(
        ["--output_dir", str(out), *DET_FAST, *extra]))


@pytest.fixture(scope="module")
def pretrained(pretrained_checkpoint):
    return pretrained_checkpoint


def test_train_evaluates_each_round_ends_with_the_schedule_and_test_reproduces_the_last_figure(tmp_path, pretrained):
    out = tmp_path / "run"
    last = _train(out, "--max_iter", "5", "--eval_period", "3", "--checkpoint_period", "3",
                  "--pretrained", str(pretrained))
    rows = read_log(out)
    assert [r["iteration"] for r in rows] == [3, 5] and last["iteration"] == 5     # rounds of 3, the last of 2
    for row in rows:
        assert 0 <= row["test_bbox_AP"] <= 100 and 0 <= row["test_segm_AP"] <= 100 and row["test_images"] == 24
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                                                   "checkpoint-best.pth"] or \
        sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth"]
    assert (out / "vis_iter_3.png").stat().st_size > 0 and (out / "vis_iter_5.png").stat().st_size > 0
    scalars = read_scalars(out / "tensorboard")
    assert sorted(step for step, _ in scalars["loss/loss"]) == [0, 1, 2, 3, 4]    # 5 updates, not 6
    assert sorted(step for step, _ in scalars["val/bbox_AP"]) == [3, 5]
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert ckpt["format"] == "mcbeit-det-v1" and ckpt["num_classes"] == 4
    assert [name for _, name in ckpt["categories"]] == ["disc", "square", "triangle", "cross"] or ckpt["categories"]
    # detectron2's warm-up + cosine: lr at iteration 1 of 5, warm-up 0.25 (iterations 0 and 1)
    lrs = dict(scalars["opt/lr"])
    import math
    cos = lambda w: 0.5 * (1 + math.cos(math.pi * w))  # noqa: E731
    assert lrs[1] == pytest.approx(1e-3 * (cos(0.25) * 0.8 + 0.001 * 0.2), rel=1e-6)
    assert lrs[4] == pytest.approx(1e-3 * cos(0.8), rel=1e-6)

    tested = detection.run(detection.get_args_parser("test").parse_args([str(out / "checkpoint-1.pth"),
                                                                         "--device", "cpu", "--num_workers", "0"]))
    assert tested["test_bbox_AP"] == pytest.approx(rows[-1]["test_bbox_AP"], abs=1e-9)
    assert tested["test_segm_AP"] == pytest.approx(rows[-1]["test_segm_AP"], abs=1e-9)


def test_a_run_resumed_mid_round_ends_bit_for_bit_where_the_uninterrupted_one_does(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ["--max_iter", "5", "--eval_period", "3", "--checkpoint_period", "3", "--save_ckpt_steps", "2",
             "--pretrained", "none", "--vis_images", "0"]
    resumed.mkdir()
    # --save_ckpt_steps counts iterations: 2 (round 0, step 2), 4 (round 1, step 1); keep the one at 4
    watcher = _keep_when_written(whole / "checkpoint-1-step1.pth", resumed / "checkpoint-1-step1.pth")
    _train(whole, *extra)
    watcher.join()
    mid = torch.load(resumed / "checkpoint-1-step1.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 1, 4)
    _train(resumed, *extra)                                                   # auto-resume at iteration 4
    a = dict(read_scalars(whole / "tensorboard")["loss/loss"])
    b = dict(read_scalars(resumed / "tensorboard")["loss/loss"])
    assert sorted(b) == [4] and all(a[step] == b[step] for step in b), (a, b)
    _assert_same_state(whole / "checkpoint-1.pth", resumed / "checkpoint-1.pth")


def _lazyconfig(args, cwd, tmp_path, timeout=480):
    proc = subprocess.run([sys.executable, "lazyconfig_train_net.py", *args], cwd=cwd, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"lazyconfig_train_net.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def test_the_seeds_lazyconfig_line_in_two_processes_from_our_pretraining_then_eval_only(tmp_path, pretrained):
    """mc-BEiT's README line from a copy of mimdet/ (the config's own relative checkpoint path holding our
    pre-training checkpoint), sizes added, --num-gpus 2 on the CPU: torchrun starts two gloo processes."""
    mimdet = tmp_path / "mimdet"
    shutil.copytree(REPO / "mimdet", mimdet)
    (mimdet / "mcbeit_pretrained").mkdir()
    shutil.copy(pretrained, mimdet / "mcbeit_pretrained" / "checkpoint-799.pth")
    work = tmp_path / "work"
    line = ["--config-file", SEED_CONFIG, "--num-gpus", "2", "--num-machines", "1", "--dist-url",
            "tcp://127.0.0.1:" + str(__import__("tests.tasks.conftest", fromlist=["free_port"]).free_port())]
    sizes = [*DET_FAST, "--total_batch_size", "4", "--vis_images", "0"]
    proc = _lazyconfig([*line, *sizes, f"train.output_dir={work}", "train.max_iter=2", "train.eval_period=2",
                        "train.checkpointer.period=2"], mimdet, tmp_path)
    assert re.search(r"backbone from .*checkpoint-799.pth", proc.stderr), proc.stderr[-3000:]
    assert "mask_token" in proc.stderr and "lm_head" in proc.stderr          # the dropped keys, listed by name
    rows = read_log(work)
    assert rows[-1]["iteration"] == 2 and rows[-1]["test_images"] == 24      # each val image counted once
    args = json.loads(proc.stderr.split("args: ", 1)[1].splitlines()[0])
    assert args["world_size"] == 2 and args["batch_size"] == 2 and args["lr"] == 1e-3 and args["max_iter"] == 2

    tested = _lazyconfig([*line, *sizes, "--eval-only", f"train.init_checkpoint={work / 'checkpoint-0.pth'}",
                          "train.output_dir="], mimdet, tmp_path)
    ap = float(re.search(r"bbox AP (\d+\.\d+)", tested.stderr).group(1))
    assert ap == pytest.approx(rows[-1]["test_bbox_AP"], abs=0.01)


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--data_path .*nowhere"):
        _train(tmp_path / "run", "--data_path", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        detection.run(detection.get_args_parser("train").parse_args(
            ["--output_dir", str(tmp_path / "empty"), *DET_FAST, "--eval_only"]))
    broken = tmp_path / "broken.pth"
    torch.save({"model": {"backbone.body.cls_token": torch.zeros(1, 1, 7)}}, broken)
    with pytest.raises(SystemExit, match="does not fit"):
        detection.run(detection.get_args_parser("test").parse_args(
            [str(broken), SEED_CONFIG.rsplit("/", 1)[1], *DET_FAST]))
