"""Exact resume and preemption (issue 6, items 1-3): a stopped and resumed run equals the uninterrupted one.

Bitwise on CPU fp32: every step's loss and the final weights and optimizer state. Drop path is on,
so the random generators must be restored too; the stops land mid-epoch.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest
import torch

from mcbeit.engine.checkpoint import latest_checkpoint
from mcbeit.engine.control import EXIT_PREEMPTED
from mcbeit.cli import pretrain
from tests.engine.test_meter import read_scalars
from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 images / batch 8 = 8 steps per epoch; drop path draws from torch's generator every step.
COMMON = ["--batch_size", "8", "--drop_path", "0.1", "--warmup_epochs", "0", "--print_freq", "1", *FAST]


def _args(image_folder, out, *extra):
    argv = ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu", *COMMON, *extra]
    return pretrain.get_args_parser().parse_args(argv)


def _losses(out):
    """{global step: loss} from the run's TensorBoard events (one point per step)."""
    return dict(read_scalars(out / "tensorboard")["loss/loss"])


def _assert_same_state(a, b):
    """Model and optimizer state of two checkpoints, bit for bit."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for index, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][name]), (index, name)


def _keep_when_written(path, dest):
    """Hard-link ``path`` (a checkpoint file, or every file of a DeepSpeed folder) to ``dest`` as soon as
    it appears: mid-epoch checkpoints are removed once a newer one is written. Returns the watcher;
    join it after the run."""
    import os
    import threading

    def watch():
        deadline = time.monotonic() + 300
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        if path.is_dir():
            shutil.copytree(path, dest, copy_function=os.link)
        else:
            os.link(path, dest)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_resuming_from_a_mid_epoch_checkpoint_continues_bit_for_bit(image_folder, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # Mid-epoch checkpoints every 5 steps: after step 5 of epoch 0, checkpoint-0-step5.pth holds that
    # position (until step 10's supersedes it: it is kept aside as it appears).
    extra = ["--epochs", "2", "--save_ckpt_steps", "5", "--save_ckpt_freq", "5"]
    resumed.mkdir()
    watcher = _keep_when_written(whole / "checkpoint-0-step5.pth", resumed / "checkpoint-0-step5.pth")
    pretrain.run(_args(image_folder, whole, *extra))
    watcher.join()
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-1.pth"]  # mid-epoch ones superseded
    mid = torch.load(resumed / "checkpoint-0-step5.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (0, 5, 5) and len(mid["rng"]) == 1
    pretrain.run(_args(image_folder, resumed, *extra))                    # auto-resume: epoch 0, step 5

    a, b = _losses(whole), _losses(resumed)
    assert sorted(a) == list(range(16)) and sorted(b) == list(range(5, 16))
    assert all(a[step] == b[step] for step in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}
    _assert_same_state(whole / "checkpoint-1.pth", resumed / "checkpoint-1.pth")


def _cmd(image_folder, out, nproc: int):
    launcher = [PYTHON] if nproc == 1 else [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                             "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    batch = str(8 // nproc)  # the same 8 steps per epoch in 1 and in 2 processes
    return [*launcher, "run_mcbeit_pretraining.py", "--data_path", str(image_folder), "--output_dir", str(out),
            "--device", "cpu", *COMMON, "--batch_size", batch, "--epochs", "3", "--save_ckpt_freq", "1"]



def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("nproc, sig", [(1, "USR1"), (2, "TERM")])
def test_a_real_signal_saves_exits_75_and_the_rerun_ends_where_the_uninterrupted_run_does(image_folder, tmp_path,
                                                                                         nproc, sig):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    env = cli_env(tmp_path)
    done = subprocess.run(_cmd(image_folder, whole, nproc), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_cmd(image_folder, stopped, nproc), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (stopped / "checkpoint-0.pth").exists():      # epoch 0 is over: the run is inside epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    # SLURM signals every task; here only ONE process gets it (with 2: a worker, not the launcher), and
    # the others must still stop with it rather than hang in the next collective.
    target = proc.pid if nproc == 1 else _children(proc.pid)[-1]
    subprocess.run(["kill", f"-{sig}", str(target)], check=True)
    _, err = proc.communicate(timeout=300)
    if nproc == 1:
        assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    else:
        assert proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in err, err[-3000:]
    assert f"SIG{sig} received: finishing this step" in err and "continue with the same command" in err
    newest = latest_checkpoint(stopped)                     # checkpoint-1-step<N>.pth: the stop's position
    position = torch.load(newest, weights_only=True)
    assert newest.name == f"checkpoint-1-step{position['step_in_epoch']}.pth"
    assert position["global_step"] < 24 and len(position["rng"]) == nproc

    again = subprocess.run(_cmd(image_folder, stopped, nproc), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {newest}" in again.stderr
    _assert_same_state(whole / "checkpoint-2.pth", stopped / "checkpoint-2.pth")
    a, b = _losses(whole), _losses(stopped)
    assert all(a[step] == b[step] for step in b)



def _tokenizer_argv(image_folder, out):
    # 64 images / batch 8 = 8 steps per epoch; dead codes re-initialised every 4 steps (random draws).
    return ["train", "--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu",
            "--input_size", "32", "--vocab_size", "64", "--embed_dim", "8", "--hidden", "8", "--batch_size", "8",
            "--num_workers", "0", "--print_freq", "1", "--lr", "3e-3", "--warmup_epochs", "0",
            "--dead_code_steps", "4", "--epochs", "3", "--save_ckpt_freq", "1"]


def test_tokenizer_training_stopped_by_a_real_signal_resumes_bit_for_bit(image_folder, tmp_path):
    import os
    import threading

    from mcbeit.cli import tokenizer as tok_task

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert tok_task.main(_tokenizer_argv(image_folder, whole)) == 0

    def signal_once_epoch_0_is_saved():
        deadline = time.monotonic() + 120
        while not (stopped / "checkpoint-0.pth").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)   # delivered to this (the training) process's main thread

    watcher = threading.Thread(target=signal_once_epoch_0_is_saved, daemon=True)
    watcher.start()
    assert tok_task.main(_tokenizer_argv(image_folder, stopped)) == EXIT_PREEMPTED
    watcher.join()
    newest = latest_checkpoint(stopped)
    assert torch.load(newest, weights_only=True)["global_step"] < 24
    assert tok_task.main(_tokenizer_argv(image_folder, stopped)) == 0
    _assert_same_state(whole / "checkpoint-2.pth", stopped / "checkpoint-2.pth")
    a, b = _losses(whole), _losses(stopped)
    assert sorted(b) == list(range(24)) and all(a[step] == b[step] for step in b)
    assert (stopped / "tokenizer.pth").read_bytes() == (whole / "tokenizer.pth").read_bytes()


def _finetune_args(data, out, *extra):
    from mcbeit.cli import finetune

    # 32 train images / batch 4 = 8 updates per epoch; mixup (numpy's generator), RandAugment and drop
    # path (torch's) all draw random numbers.
    argv = ["--data_path", str(data), "--output_dir", str(out), "--model", "beit_tiny_patch16_224",
            "--input_size", "64", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
            "--epochs", "2", "--warmup_epochs", "0", "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1",
            "--model_ema", "--model_ema_decay", "0.9", "--save_ckpt_steps", "5", "--save_ckpt_freq", "5", *extra]
    return finetune.get_args_parser().parse_args(argv)


@pytest.mark.parametrize("deepspeed", [False, True], ids=["plain", "deepspeed"])
def test_finetuning_resumed_mid_epoch_continues_bit_for_bit(tmp_path, deepspeed):
    from mcbeit.cli import finetune
    from tests.tasks.conftest import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", n_per_class=8, size=64, seed=1)
    make_image_folder(data / "val", n_per_class=2, size=64, seed=2)
    extra = ["--enable_deepspeed"] if deepspeed else []
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    name = "checkpoint-0-step5" if deepspeed else "checkpoint-0-step5.pth"  # written after update 5 of epoch 0
    resumed.mkdir()
    watcher = _keep_when_written(whole / name, resumed / name)            # superseded at update 10
    finetune.run(_finetune_args(data, whole, *extra))
    watcher.join()
    assert not (whole / name).exists()
    if deepspeed:
        (resumed / "latest").write_text(name)
    finetune.run(_finetune_args(data, resumed, *extra))

    a, b = _losses(whole), _losses(resumed)
    assert sorted(a) == list(range(16)) and sorted(b) == list(range(5, 16))
    assert all(a[step] == b[step] for step in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}
    if deepspeed:
        from mcbeit.models.checkpoint import read_checkpoint, resolve_source, select_state_dict

        wa, wb = (select_state_dict(read_checkpoint(resolve_source(str(d / "checkpoint-1"))), "module|model")[0]
                  for d in (whole, resumed))
        assert all(torch.equal(v, wb[k]) for k, v in wa.items())
    else:
        _assert_same_state(whole / "checkpoint-1.pth", resumed / "checkpoint-1.pth")
        ema_a, ema_b = (torch.load(d / "checkpoint-1.pth", weights_only=True)["model_ema"] for d in (whole, resumed))
        assert all(torch.equal(v, ema_b[k]) for k, v in ema_a.items())


def test_a_stop_on_an_epochs_last_step_is_evaluated_when_the_run_resumes(tmp_path, monkeypatch):
    """SIGUSR1 arriving during the last update of epoch 0: the run saves and exits before that epoch's
    evaluation (no delay after the signal); the resumed run evaluates epoch 0 first, so log.txt, the
    best checkpoint and the final state equal the uninterrupted run's."""
    import json
    import os

    from mcbeit.engine.control import Preempted
    from mcbeit.cli import finetune
    from tests.tasks.conftest import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", n_per_class=8, size=64, seed=1)
    make_image_folder(data / "val", n_per_class=2, size=64, seed=2)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    extra = ["--save_ckpt_freq", "1"]
    finetune.run(_finetune_args(data, whole, *extra))

    from mcbeit.tasks import finetune as finetune_task

    build = finetune_task.build_criterion

    def signalling_criterion(smoothing, mixup):    # a real signal, sent during the 8th (last) update of epoch 0
        criterion, calls = build(smoothing, mixup), []

        def loss(*inputs):
            calls.append(1)
            if len(calls) == 8:
                os.kill(os.getpid(), signal.SIGUSR1)
            return criterion(*inputs)
        return loss

    monkeypatch.setattr(finetune_task, "build_criterion", signalling_criterion)
    with pytest.raises(Preempted):
        finetune.run(_finetune_args(data, stopped, *extra))
    monkeypatch.undo()
    saved = torch.load(stopped / "checkpoint-0.pth", weights_only=True)
    assert saved["step_in_epoch"] == 8 and saved["evaluated"] is False
    assert not (stopped / "log.txt").exists() or "test_acc1" not in (stopped / "log.txt").read_text()

    finetune.run(_finetune_args(data, stopped, *extra))
    rows = [[json.loads(line) for line in (d / "log.txt").read_text().splitlines()] for d in (whole, stopped)]
    assert [r["epoch"] for r in rows[1]] == [0, 1]
    for a, b in zip(*rows, strict=True):
        assert (a["test_acc1"], a["test_loss"], a["max_accuracy"]) == (b["test_acc1"], b["test_loss"], b["max_accuracy"])
    assert torch.load(stopped / "checkpoint-0.pth", weights_only=True)["evaluated"] is True
    _assert_same_state(whole / "checkpoint-1.pth", stopped / "checkpoint-1.pth")
    best_a, best_b = (torch.load(d / "checkpoint-best.pth", weights_only=True) for d in (whole, stopped))
    assert best_a["epoch"] == best_b["epoch"] and best_a["max_accuracy"] == best_b["max_accuracy"]
    assert all(torch.equal(v, best_b["model"][k]) for k, v in best_a["model"].items())
