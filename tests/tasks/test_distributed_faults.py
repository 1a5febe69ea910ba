"""Distributed faults and launchers beyond one torchrun (issue 6, items 9 and 10), with real processes.

- a worker killed with SIGKILL: torchrun (--max-restarts 1) restarts the group, which resumes from
  the last checkpoint and ends exactly where an uninterrupted run ends;
- a worker that hangs (SIGSTOP): the other gives up after --dist_timeout with exit status 5, and
  torchrun restarts the group, which resumes;
- two torchrun invocations with --nnodes 2 and c10d rendezvous on loopback form one job;
- SLURM: processes started with srun's environment (SLURM_PROCID, SLURM_NTASKS, ...) form one job.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, free_port
from tests.tasks.test_resume import _assert_same_state, _children

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_flags(image_folder, out, epochs: int, batch: int) -> list[str]:
    return ["run_mcbeit_pretraining.py", "--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu",
            *FAST, "--batch_size", str(batch), "--drop_path", "0.1", "--warmup_epochs", "0", "--epochs", str(epochs),
            "--save_ckpt_freq", "1"]


def _torchrun(*extra: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", *extra]


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(image_folder, tmp_path):
    env = cli_env(tmp_path)
    whole, faulty = tmp_path / "whole", tmp_path / "faulty"
    launcher = ["--nproc_per_node=2", "--master_addr=127.0.0.1"]
    done = subprocess.run(_torchrun(*launcher, f"--master_port={free_port()}") + _train_flags(image_folder, whole, 3, 4),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    cmd = _torchrun(*launcher, f"--master_port={free_port()}", "--max-restarts=1") + _train_flags(image_folder, faulty, 3, 4)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (faulty / "checkpoint-0.pth").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = _children(proc.pid)[-1]
    os.kill(victim, 9)                                      # no signal handler runs: the process is gone
    started = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert time.monotonic() - started < 300                 # the survivor did not hang on its dead peer
    assert "failed (exitcode: -9)" in err                   # torchrun saw the kill ...
    assert f"resumed from {faulty / 'checkpoint-0.pth'}" in err  # ... and the restarted group resumed
    _assert_same_state(whole / "checkpoint-2.pth", faulty / "checkpoint-2.pth")


def test_a_hanging_rank_times_out_and_torchrun_restarts_the_group(image_folder, tmp_path):
    """A worker that hangs (stopped with SIGSTOP: alive, connections open, never answering): the other
    rank gives up after --dist_timeout instead of waiting forever, says why, exits with status 5;
    torchrun replaces the group, which resumes from the last checkpoint and finishes."""
    out = tmp_path / "run"
    cmd = (_torchrun("--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max-restarts=1")
           + _train_flags(image_folder, out, 3, 4) + ["--dist_timeout", "0.2"])   # 12 s
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-0.pth").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = _children(proc.pid)[-1]
    os.kill(victim, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.kill(victim, signal.SIGKILL)
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert "lost the others" in err and "--dist_timeout (0.2 min)" in err   # the survivor said why ...
    assert "exitcode  : 5" in err or "exitcode: 5" in err                    # ... and exited with status 5
    assert f"resumed from {out / 'checkpoint-0.pth'}" in err                # the new group resumed
    final = torch.load(out / "checkpoint-2.pth", weights_only=True)
    assert final["global_step"] == 24 and final["epoch"] == 2               # and finished: 3 epochs x 8 steps


def test_two_torchrun_nodes_on_loopback_form_one_job_that_checkpoints_once_and_resumes(image_folder, tmp_path):
    env = cli_env(tmp_path)
    out = tmp_path / "run"

    def both_nodes(epochs: int) -> None:
        endpoint = f"127.0.0.1:{free_port()}"
        nodes = [subprocess.Popen(_torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=mcbeit-test")
                                  + _train_flags(image_folder, out, epochs, 8) + ["--accept_changed_flags", "epochs"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
        errs = [node.communicate(timeout=600)[1] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n---\n".join(e[-3000:] for e in errs)

    both_nodes(1)
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth"]
    first = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert first["args"]["world_size"] == 2 and len(first["rng"]) == 2 and first["global_step"] == 4  # 64 / (8 x 2)
    both_nodes(2)                                            # auto-resume: epoch 1 only
    second = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert second["global_step"] == 8 and second["epoch"] == 1
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]  # one row per epoch: only the main node's rank 0 writes
    assert rows[1]["resumed_from"]["checkpoint"] == str((out / "checkpoint-0.pth").resolve())


def test_srun_environment_forms_the_process_group(image_folder, tmp_path):
    """What srun gives each task (no SLURM here): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, plus the
    MASTER_ADDR / MASTER_PORT an sbatch script exports (README)."""
    out = tmp_path / "run"
    port = str(free_port())
    tasks = []
    for rank in (0, 1):
        env = {k: v for k, v in cli_env(tmp_path).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        tasks.append(subprocess.Popen([PYTHON] + _train_flags(image_folder, out, 1, 8), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [t.communicate(timeout=600)[1] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], "\n---\n".join(e[-3000:] for e in errs)
    assert "16 images per step (2 processes)" in errs[0]     # rank 0 speaks for the job
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["global_step"] == 4
