"""Stops as clusters and people send them (issue 14, cases 1 and 2), with real signals and processes.

- 1 process with data-loader workers, started in a session of its own so its process group is just
  the run (what a terminal's Ctrl-C, ``kill -TERM -PGID`` and SLURM reach): SIGTERM or SIGINT to the
  whole group ends with a checkpoint and exit 75, and the rerun ends bit for bit where the
  uninterrupted run ends; a second SIGINT stops at once (130) without leaving a temporary file or
  harming a checkpoint; a stop during set-up ends before training with 75.
- 2 processes under ``python -m mcbeit.launch`` (mcbeit-torchrun), loader workers in each: SIGTERM to
  the launcher's group, SIGUSR1 to one rank only (with ``--max-restarts 1``: the stopped group is not
  restarted), a double Ctrl-C at the launcher.

Today's failures these reproduce: the loader workers died first ("DataLoader worker ... exited
unexpectedly", exit 1, no checkpoint), Ctrl-C was a KeyboardInterrupt traceback (no checkpoint), and
torchrun exited 1 whatever its workers did.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from mcbeit.engine.checkpoint import checkpoint_problem
from mcbeit.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, free_port
from tests.tasks.test_resume import _assert_same_state, _children, _losses

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 images, 8 steps in one epoch (batch 8 in 1 process, 4 in 2); drop path draws random numbers every
# step. The progress bar's "2/8" is the cue to send the signal: the stop lands inside the epoch.
COMMON = [*FAST, "--drop_path", "0.1", "--warmup_epochs", "0", "--print_freq", "1", "--epochs", "1"]


def _script(image_folder, out, nproc: int, workers: int) -> list[str]:
    return ["run_mcbeit_pretraining.py", "--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu",
            *COMMON, "--batch_size", str(8 // nproc), "--num_workers", str(workers)]


def _one(image_folder, out, *extra: str) -> list[str]:
    return [PYTHON, *_script(image_folder, out, 1, 2), *extra]


def _launched(image_folder, out, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [PYTHON, "-m", "mcbeit.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *launcher, *_script(image_folder, out, 2, 1), *extra]


class Run:
    """A command in a session (and process group) of its own; its stderr is read as it comes."""

    def __init__(self, cmd: list[str], tmp_path: Path):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_for(self, cue, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not cue():
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before {what}:\n{self.err[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.err[-4000:]}"
            time.sleep(0.01)

    def wait_for_step(self, step: int = 2) -> None:
        self.wait_for(lambda: f" {step}/8 [" in self.err, f"step {step}")   # the bar's \r ends a line here

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=10)
        return code


def _run_to_end(cmd, tmp_path) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _assert_resumes_bit_for_bit(cmd, whole: Path, stopped: Path, tmp_path) -> None:
    """The rerun of the stopped run resumes where it stopped and ends where the uninterrupted one ended."""
    err = _run_to_end(cmd, tmp_path)
    assert "resumed from" in err
    _assert_same_state(whole / "checkpoint-0.pth", stopped / "checkpoint-0.pth")
    a, b = _losses(whole), _losses(stopped)
    assert sorted(b) == list(range(8)) and all(a[step] == b[step] for step in b)


def _assert_nothing_half_written(out: Path) -> None:
    assert not [p.name for p in out.rglob("*.tmp")]
    checkpoints = list(out.glob("checkpoint-*"))
    assert checkpoints and all(checkpoint_problem(p) is None for p in checkpoints)


@pytest.fixture(scope="module")
def whole_one(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole1") / "run"
    _run_to_end(_one(image_folder, out), out.parent)
    return out


@pytest.fixture(scope="module")
def whole_two(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole2") / "run"
    _run_to_end(_launched(image_folder, out), out.parent)
    return out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_group_with_loader_workers_saves_exits_75_and_resumes_bit_for_bit(
        image_folder, tmp_path, whole_one, sig):
    stopped = tmp_path / "stopped"
    run = Run(_one(image_folder, stopped), tmp_path)
    run.wait_for_step()
    os.killpg(run.proc.pid, getattr(signal, sig))           # the run and its 2 loader workers
    assert run.finish() == EXIT_PREEMPTED, run.err[-4000:]
    assert f"{sig} received: finishing this step" in run.err and "continue with the same command" in run.err
    assert "Traceback" not in run.err and "killed by signal" not in run.err
    _assert_nothing_half_written(stopped)
    _assert_resumes_bit_for_bit(_one(image_folder, stopped), whole_one, stopped, tmp_path)


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_half_written_file(image_folder, tmp_path):
    out = tmp_path / "run"
    run = Run(_one(image_folder, out, "--save_ckpt_steps", "2"), tmp_path)   # a checkpoint to keep whole
    run.wait_for_step(3)
    os.killpg(run.proc.pid, signal.SIGINT)
    run.wait_for(lambda: "SIGINT received" in run.err, "first SIGINT handled")
    os.killpg(run.proc.pid, signal.SIGINT)                  # while the step finishes or the checkpoint is written
    assert run.finish() == EXIT_INTERRUPTED, run.err[-4000:]
    assert "stopping at once" in run.err and "Traceback" not in run.err
    _assert_nothing_half_written(out)


def test_a_stop_while_the_run_is_set_up_ends_it_before_training_with_75(image_folder, tmp_path):
    out = tmp_path / "run"
    run = Run(_one(image_folder, out), tmp_path)
    run.wait_for(lambda: "args: " in run.err, "set-up")      # joined, inputs checked; model and data follow
    os.killpg(run.proc.pid, signal.SIGTERM)
    assert run.finish() == EXIT_PREEMPTED, run.err[-4000:]
    assert "before training started" in run.err and "Traceback" not in run.err
    assert not list(out.glob("checkpoint-*"))


def test_sigterm_to_the_launchers_group_stops_every_rank_with_75_and_resumes_bit_for_bit(
        image_folder, tmp_path, whole_two):
    stopped = tmp_path / "stopped"
    run = Run(_launched(image_folder, stopped), tmp_path)
    run.wait_for_step()
    os.killpg(run.proc.pid, signal.SIGTERM)                 # the launcher's group (its workers have their own)
    assert run.finish() == EXIT_PREEMPTED, run.err[-4000:]
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING mcbeit: stopped on " in run.err, run.err[-4000:]
    assert "every worker wrote its checkpoint: exit 75" in run.err
    _assert_nothing_half_written(stopped)
    _assert_resumes_bit_for_bit(_launched(image_folder, stopped), whole_two, stopped, tmp_path)


def test_sigusr1_to_one_rank_stops_all_with_75_and_the_launcher_does_not_restart_them(image_folder, tmp_path):
    out = tmp_path / "run"
    run = Run(_launched(image_folder, out, launcher=("--max-restarts=1",)), tmp_path)
    run.wait_for_step()
    os.kill(_children(run.proc.pid)[-1], signal.SIGUSR1)   # one worker (SLURM would signal each)
    assert run.finish() == EXIT_PREEMPTED, run.err[-4000:]
    assert "stopped on SIGUSR1" in run.err and "stopped on a signal on another rank" in run.err
    assert "every worker wrote its checkpoint: exit 75" in run.err
    assert "resumed from" not in run.err                    # not restarted
    newest = max(out.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] < 8


def test_a_second_ctrl_c_at_the_launcher_stops_the_workers_at_once(image_folder, tmp_path):
    out = tmp_path / "run"
    run = Run(_launched(image_folder, out, "--save_ckpt_steps", "2"), tmp_path)
    run.wait_for_step(3)
    os.kill(run.proc.pid, signal.SIGINT)                    # a terminal's Ctrl-C reaches the launcher only
    run.wait_for(lambda: run.err.count("SIGTERM received") == 2, "the workers told to stop")
    os.kill(run.proc.pid, signal.SIGINT)
    assert run.finish() == EXIT_INTERRUPTED, run.err[-4000:]
    assert run.err.count("stopping at once") == 2 and "Traceback" not in run.err
    _assert_nothing_half_written(out)
