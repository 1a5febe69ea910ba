"""What a run leaves to read (issue 14, case 10, second half): log.txt rows with a timestamp, images/s,
the epoch's time and, after a resume, where the run went on from; TensorBoard's temperature, skipped
images and memory; and ``tensorboard --logdir OUTPUT`` (the real viewer, installed with the package)
shows the run.

A real run stopped by a real signal mid-epoch and resumed by the same command, then the real
TensorBoard server started on the output folder and asked over HTTP for the run's scalar tags.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from datetime import datetime

import pytest
import torch

from mcbeit.errors import EXIT_PREEMPTED
from tests.engine.test_meter import read_scalars
from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, make_image_folder
from tests.tasks.conftest import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

SPE = 8  # 64 images / batch 8
NEW_TAGS = {"temperature/tokenizer_softmax", "temperature/patch_similarity", "data/skipped_images",
            "memory/rss_peak_gib", "speed/images_per_s"}


def _command(data, out) -> list[str]:
    return [PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(data), "--output_dir", str(out), "--device", "cpu",
            *FAST, "--batch_size", "8", "--epochs", "2", "--save_ckpt_freq", "1", "--warmup_epochs", "0", "--temp_warmup", "2.0",
            "--temp_warmup_epochs", "2"]


def _stopped_and_resumed(tmp_path):
    """Run, stop with SIGUSR1 inside epoch 1 (exit 75), run the same command again: the output folder,
    the stop's checkpoint and its position (read before the rerun, whose epoch end may prune it)."""
    data, out, env = make_image_folder(tmp_path / "data", n_per_class=16, size=64), tmp_path / "out", cli_env(tmp_path)
    proc = subprocess.Popen(_command(data, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-0.pth").exists():          # epoch 0 is over: the run is inside epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    saved = re.search(r"continue with the same command \(auto-resume\): (\S+)", err)
    assert saved, err[-3000:]
    position = torch.load(saved.group(1), weights_only=True)
    again = subprocess.run(_command(data, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    return out, saved.group(1), position


def _tensorboard_tags(logdir, deadline_s: float = 90.0) -> dict[str, set[str]]:
    """{run: scalar tags} as the real ``tensorboard --logdir`` serves them, once it has loaded the events."""
    port = free_port()
    server = subprocess.Popen([shutil.which("tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tags: dict[str, set[str]] = {}
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not any(NEW_TAGS | {"loss/loss"} <= t for t in tags.values()):
            assert server.poll() is None, server.communicate()[0][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as reply:
                    tags = {run: set(names) for run, names in json.load(reply).items()}
            except OSError:                                 # not listening yet
                pass
            time.sleep(0.25)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    return tags


def test_log_rows_mark_the_resume_and_tensorboard_shows_the_run(tmp_path):
    out, checkpoint, position = _stopped_and_resumed(tmp_path)

    first, second = (json.loads(line) for line in (out / "log.txt").read_text().splitlines())
    for row in (first, second):
        assert datetime.fromisoformat(row["time"]).tzinfo is not None     # a timestamp with its UTC offset
        assert row["epoch_time_s"] > 0 and row["train_images_per_s"] > 0
    assert first["epoch"] == 0 and "resumed_from" not in first
    assert (first["train_steps"], first["train_images"]) == (SPE, SPE * 8)

    # The resumed epoch's row says which checkpoint and which position; its figures are of the steps after it.
    resumed = second["resumed_from"]
    assert resumed["checkpoint"] == checkpoint
    assert (resumed["epoch"], resumed["step"]) == (1, position["step_in_epoch"]) == (position["epoch"], resumed["step"])
    assert resumed["global_step"] == position["global_step"] == SPE + resumed["step"]
    assert 0 < resumed["step"] < SPE
    assert (second["epoch"], second["train_steps"]) == (1, SPE - resumed["step"])
    assert second["train_images"] == second["train_steps"] * 8

    scalars = read_scalars(out / "tensorboard")
    # the warm-up's 2 epochs: 2.0 at epoch 0, 4.0 at epoch 1 (at its start, and again where the rerun went on)
    assert dict(scalars["temperature/tokenizer_softmax"]) == {0: 2.0, SPE: 4.0, SPE + resumed["step"]: 4.0}
    assert {step for step, _ in scalars["data/skipped_images"]} == set(range(2 * SPE))          # every step
    assert all(0.05 < gib < 64 for _, gib in scalars["memory/rss_peak_gib"])

    # The viewer the package installs shows the run: the real server, asked over HTTP.
    tags = _tensorboard_tags(out)
    assert any(NEW_TAGS | {"loss/loss", "opt/lr"} <= names for names in tags.values()), tags
