"""The k-NN monitor of pre-training, end to end (issue 15): what it logs and when, that it leaves
training untouched, that 2 processes measure what 1 process measures, and when it is off."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from tests.tasks.conftest import FAST, PYTHON, cli_env, free_port, REPO, run_cli

#: 64 images at 8 a step: 8 steps an epoch
COMMON = ["--device", "cpu", "--batch_size", "8", "--warmup_epochs", "1", *FAST]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _tensorboard_tags(out: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in sorted((out / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def test_the_monitor_measures_every_eval_freq_epochs_and_at_the_end_without_changing_training(labelled_root, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    proc = run_cli([PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(labelled_root), "--output_dir", str(on),
                    "--epochs", "3", "--eval_freq", "2", "--eval_linear", "--nb_knn", "5", "20", *COMMON], tmp_path)
    run_cli([PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(labelled_root), "--output_dir", str(off),
             "--epochs", "3", "--eval_freq", "0", *COMMON], tmp_path)
    rows = _rows(on)
    measured = [r["epoch"] for r in rows if "knn_top1" in r]
    assert measured == [1, 2]                                      # every 2nd epoch, and the last
    last = rows[-1]
    assert last["knn_train_images"] == 64 and last["knn_val_images"] == 24
    for feature in ("cls", "patch_mean", "cls@8", "patch_mean@8"):  # block 8 of 0..11 by default
        for k in (5, 20):
            assert 0 <= last[f"knn_{feature}_k{k}_top1"] <= last[f"knn_{feature}_k{k}_top5"] <= 100
        assert 0 <= last[f"linear_{feature}_top1"] <= 100
    assert last["knn_top1"] == last["knn_patch_mean_k5_top1"]     # the headline: the first k, mean patch token
    assert "k-NN top-1" in proc.stderr and "block 8:" in proc.stderr and "linear" in proc.stderr
    tags = _tensorboard_tags(on)
    assert tags["knn/knn_top1"] == [16, 24] and "knn/linear_patch_mean_top1" in tags   # at each measured epoch's end
    # the monitor runs under its own random state: the same losses and weights as without it
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in _rows(off)]
    a = torch.load(on / "checkpoint-2.pth", weights_only=True)["model"]
    b = torch.load(off / "checkpoint-2.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_measure_each_image_once_as_one_process_does(labelled_root, tmp_path):
    out = tmp_path / "two"
    run_cli([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", "run_mcbeit_pretraining.py", "--data_path", str(labelled_root),
             "--output_dir", str(out), "--epochs", "1", "--eval_linear", "--nb_knn", "5", "20",
             "--eval_block", "3", *COMMON], tmp_path)
    (logged,) = _rows(out)
    assert logged["knn_val_images"] == 24 and logged["knn_train_images"] == 64   # 12 + 12, 32 + 32: each once
    report = tmp_path / "one.json"
    run_cli([PYTHON, "-m", "mcbeit.cli.knn", "--resume", str(out / "checkpoint-0.pth"), "--data_path",
             str(labelled_root), "--block", "3", "--nb_knn", "5", "20", "--eval_linear", "--num_workers", "0",
             "--device", "cpu", "--output", str(report)], tmp_path)
    one = json.loads(report.read_text())
    assert one["num_val"] == 24
    for feature, by_k in one["knn"].items():
        for k, acc in by_k.items():
            assert logged[f"knn_{feature}_k{k}_top1"] == acc["top1"], (feature, k)
            assert logged[f"knn_{feature}_k{k}_top5"] == acc["top5"], (feature, k)
    for feature, acc in one["linear"].items():   # fitted on gathered features: equal up to one image's flip
        assert abs(logged[f"linear_{feature}_top1"] - acc["top1"]) <= 100 / 24 + 1e-9, feature


def test_without_a_labelled_split_the_monitor_is_off_and_says_why(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = run_cli([PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(image_folder), "--output_dir", str(out),
                    "--epochs", "1", *COMMON], tmp_path)
    assert "k-NN monitor off" in proc.stderr and "no val split found" in proc.stderr
    assert not any(k.startswith("knn") for k in _rows(out)[0])


def test_a_missing_eval_data_path_stops_before_training(image_folder, tmp_path):
    proc = subprocess.run([PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(image_folder), "--output_dir",
                           str(tmp_path / "run"), "--epochs", "1", "--eval_data_path", str(tmp_path / "nowhere"),
                           *COMMON], cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--eval_data_path" in proc.stderr and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "log.txt").exists()


def test_an_eval_block_beyond_the_model_is_refused_before_training(labelled_root, tmp_path):
    proc = subprocess.run([PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(labelled_root), "--output_dir",
                           str(tmp_path / "run"), "--epochs", "1", "--eval_block", "12", *COMMON], cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--eval_block 12" in proc.stderr and "0..11" in proc.stderr
    assert "Traceback" not in proc.stderr
