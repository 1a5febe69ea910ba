"""Semantic segmentation end to end (mcbeit-seg, the seeds' tools/dist_train.sh and dist_test.sh): the embedded
scenes through mmseg's pipeline, training counted in iterations with evaluation rounds, checkpoints, visualisations,
exact resume mid-round, the seed's command line in two processes from a pre-training checkpoint of ours, and a
released-format (unilm) ADE20K file evaluated by the seed's test line."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from mcbeit.cli import segmentation
from tests.engine.test_meter import read_scalars
from tests.tasks.conftest import REPO, cli_env, read_log
from tests.tasks.test_resume import _assert_same_state, _keep_when_written

pytestmark = pytest.mark.usefixtures("one_thread")

SEED_CONFIG = "configs/mcbeit/upernet/upernet_mcbeit_base_12_512_slide_160k_ade20k_pt"
# a tiny UperNet at 32 px (2x2 patches): the seed's recipe otherwise
SEG_FAST = ["--model", "beit_tiny_patch16_224", "--crop_size", "32", "--img_scale", "128", "32", "--channels", "32",
            "--aux_channels", "16", "--batch_size", "2", "--num_workers", "0", "--print_freq", "1", "--device", "cpu",
            "--vis_images", "2", "--warmup_iters", "2", "--lr", "1e-3"]


def _train(out, *extra):
    return segmentation.run(segmentation.get_args_parser("train").parse_args(
        ["--output_dir", str(out), *SEG_FAST, *extra]))


@pytest.fixture(scope="module")
def pretrained(pretrained_checkpoint):
    return pretrained_checkpoint


def test_train_evaluates_each_round_and_test_reproduces_the_last_figure(tmp_path, pretrained):
    out = tmp_path / "run"
    last = _train(out, "--max_iters", "4", "--eval_interval", "2", "--checkpoint_interval", "2",
                  "--pretrained", str(pretrained))
    rows = read_log(out)
    assert [r["iteration"] for r in rows] == [2, 4] and last["iteration"] == 4
    for row in rows:
        assert 0 <= row["test_mIoU"] <= 100 and 0 < row["test_aAcc"] <= 100 and row["test_images"] == 24
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                                                   "checkpoint-best.pth"]
    assert (out / "vis_iter_2.png").stat().st_size > 0 and (out / "vis_iter_4.png").stat().st_size > 0
    scalars = read_scalars(out / "tensorboard")
    assert sorted(step for step, _ in scalars["val/mIoU"]) == [2, 4]
    assert sorted(step for step, _ in scalars["loss/loss"]) == [0, 1, 2, 3]
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert ckpt["format"] == "mcbeit-seg-v1" and ckpt["global_step"] == 4 and ckpt["num_classes"] == 5
    assert ckpt["classes"][0] == "background"
    # the poly schedule with mmcv's warm-up: lr at iteration 1 = 1e-3 x (1 - 1/4) x (1 - (1 - 1/2)(1 - 1e-6))
    lrs = dict(scalars["opt/lr"])
    assert lrs[1] == pytest.approx(1e-3 * 0.75 * (1 - 0.5 * (1 - 1e-6)), rel=1e-6)

    tested = segmentation.run(segmentation.get_args_parser("test").parse_args(
        [SEED_CONFIG, str(out / "checkpoint-1.pth"), "--eval", "mIoU", *SEG_FAST]))
    assert tested["test_mIoU"] == pytest.approx(rows[-1]["test_mIoU"], abs=1e-9)
    assert tested["test_images"] == 24


def test_a_run_resumed_mid_round_ends_bit_for_bit_where_the_uninterrupted_one_does(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ["--max_iters", "6", "--eval_interval", "3", "--checkpoint_interval", "3", "--save_ckpt_steps", "2",
             "--pretrained", "none", "--no_validate"]
    resumed.mkdir()
    # --save_ckpt_steps counts iterations: 2 (round 0, step 2), 4 (round 1, step 1), ...; keep the one at 4
    watcher = _keep_when_written(whole / "checkpoint-1-step1.pth", resumed / "checkpoint-1-step1.pth")
    _train(whole, *extra)
    watcher.join()
    mid = torch.load(resumed / "checkpoint-1-step1.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 1, 4)
    _train(resumed, *extra)                                                   # auto-resume at iteration 4
    a = dict(read_scalars(whole / "tensorboard")["loss/loss"])
    b = dict(read_scalars(resumed / "tensorboard")["loss/loss"])
    assert sorted(b) == [4, 5] and all(a[step] == b[step] for step in b), (a, b)
    _assert_same_state(whole / "checkpoint-1.pth", resumed / "checkpoint-1.pth")


def _bash(script, args, tmp_path, timeout=420):
    proc = subprocess.run(["bash", script, *args], cwd=REPO / "semantic_segmentation", env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_the_seeds_dist_train_line_in_two_processes_from_our_pretraining_then_dist_test(tmp_path, pretrained):
    """mc-BEiT's README line (config without .py, --options model.pretrained=CKP) with sizes added, 2 processes."""
    work = tmp_path / "work"
    proc = _bash("tools/dist_train.sh", [SEED_CONFIG, "2", "--work-dir", str(work), "--seed", "0", "--deterministic",
                                         "--options", f"model.pretrained={pretrained}", *SEG_FAST, "--max_iters", "2",
                                         "--eval_interval", "2", "--checkpoint_interval", "2"], tmp_path)
    assert re.search(r"backbone from .*checkpoint-0.pth", proc.stderr), proc.stderr[-3000:]
    assert "mask_token" in proc.stderr and "lm_head" in proc.stderr          # the dropped keys, listed by name
    rows = read_log(work)
    assert rows[-1]["iteration"] == 2 and rows[-1]["test_images"] == 24      # each val image counted once
    assert json.loads(proc.stderr.split("args: ", 1)[1].splitlines()[0])["world_size"] == 2
    ckpt = torch.load(work / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["layer_decay"] == 0.9  # the preset's decay, the flag's lr

    tested = _bash("tools/dist_test.sh", [SEED_CONFIG, str(work / "checkpoint-0.pth"), "2", "--eval", "mIoU",
                                          *SEG_FAST], tmp_path)
    miou = float(re.search(r"mIoU (\d+\.\d+)", tested.stderr).group(1))
    assert miou == pytest.approx(rows[-1]["test_mIoU"], abs=0.01)


def test_a_released_unilm_ade20k_file_evaluates_through_the_seeds_test_line(tmp_path):
    """unilm's released files: {'meta', 'state_dict'} with backbone.* (index buffers too), decode_head.*,
    auxiliary_head.*; dist_test.sh evaluates one as our own checkpoint of the same weights."""
    from mcbeit.models.segmentation import build_segmentor

    torch.manual_seed(0)
    model = build_segmentor("beit_tiny_patch16_224", num_classes=5, img_size=32, channels=32, aux_channels=16)
    state = {k: v for k, v in model.state_dict().items()}
    for i in range(len(model.backbone.blocks)):                                # the original saves every buffer
        grid = 2 * 2 + 1
        state[f"backbone.blocks.{i}.attn.relative_position_index"] = torch.zeros(grid, grid, dtype=torch.long)
    released = tmp_path / "upernet_beit_tiny_32_ade20k.pth"
    torch.save({"meta": {"CLASSES": ["a"] * 5, "iter": 160000}, "state_dict": state}, released)
    ours = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict()}, ours)
    a = _bash("tools/dist_test.sh", [SEED_CONFIG, str(released), "1", "--eval", "mIoU", *SEG_FAST], tmp_path)
    assert "relative_position_index" in a.stderr                              # dropped, and said so
    b = _bash("tools/dist_test.sh", [SEED_CONFIG, str(ours), "1", "--eval", "mIoU", *SEG_FAST], tmp_path)
    pick = lambda proc: re.search(r"mIoU (\d+\.\d+), mAcc (\d+\.\d+), aAcc (\d+\.\d+)", proc.stderr).groups()  # noqa: E731
    assert pick(a) == pick(b)


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--data_path .*nowhere: no such file"):
        _train(tmp_path / "run", "--data_path", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        segmentation.run(segmentation.get_args_parser("train").parse_args(
            ["--output_dir", str(tmp_path / "empty"), *SEG_FAST, "--eval"]))
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1, 1, 7)}}, broken)
    with pytest.raises(SystemExit, match="does not fit"):
        segmentation.run(segmentation.get_args_parser("test").parse_args(
            [SEED_CONFIG, str(broken), *SEG_FAST]))
    shutil.rmtree(tmp_path, ignore_errors=True)
