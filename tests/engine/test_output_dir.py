"""The output folder (issue 14, cases 3, 7 and 9), with real processes, real files and real training.

- one run per folder: a second run on a folder a live run holds stops before training with exit 1,
  naming the holder; a lock left by a killed run is taken over with a warning naming it; two
  processes take one lock, and a held folder stops both ranks at once (no hang);
- an output or TensorBoard folder that cannot be written stops the run before training, in one line;
- what a save killed with SIGKILL left (write_atomic's temporary file, a DeepSpeed staging folder)
  is removed at the next start, under the lock, named with its size.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mcbeit.engine.output_dir import LOCK_NAME, OutputLock, orphans
from mcbeit.errors import EXIT_INPUT
from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 real JPEGs in 4 class folders: 4 steps of 8 images per epoch."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_per_class=8, size=64)


def _pretrain(images: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "run_mcbeit_pretraining.py", "--data_path", str(images), "--output_dir", str(out),
            "--device", "cpu", *FAST, "--batch_size", "8", "--warmup_epochs", "0", *extra]


def _start(cmd: list[str], tmp_path: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)


def _hold_lock(folder: Path, tmp_path: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a live run does) until it is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import time; from mcbeit.engine.output_dir import OutputLock; "
            f"OutputLock.acquire({str(folder)!r}); print('held', flush=True); time.sleep(600)")
    proc = _start([PYTHON, "-c", code], tmp_path)
    assert proc.stdout.readline().strip() == "held", proc.communicate()[1][-2000:]
    return proc


def test_a_second_run_on_a_live_runs_folder_stops_naming_it_and_a_killed_runs_lock_is_taken_over(images, tmp_path):
    out = tmp_path / "out"
    # Case 3 of the issue: today both run, resume each other's checkpoints and overwrite checkpoint-0.pth.
    first = _start(_pretrain(images, out, "--epochs", "300", "--save_ckpt_freq", "300"), tmp_path)
    try:
        _wait_for(out / "tensorboard", first)                     # the lock is held; training has started
        started = time.monotonic()
        second = subprocess.run(_pretrain(images, out, "--epochs", "300", "--save_ckpt_freq", "300"), cwd=REPO,
                                env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_INPUT, second.stderr[-3000:]
        assert time.monotonic() - started < 60
        message = second.stderr.strip().splitlines()[-1]
        assert f"--output_dir {out} is in use by another run (pid {first.pid} on {socket.gethostname()}" in message
        assert "run_mcbeit_pretraining.py" in message and "since " in message and "another --output_dir" in message
        assert "Traceback" not in second.stderr and "steps per epoch" not in second.stderr  # nothing was built
        assert first.poll() is None                               # the first run goes on, untouched
    finally:
        first.kill()                                              # SIGKILL: no handler runs, the lock file stays
        first.communicate()
    assert f"pid {first.pid}" in (out / LOCK_NAME).read_text()
    left = _killed_save(out, tmp_path)

    third = subprocess.run(_pretrain(images, out, "--epochs", "1"), cwd=REPO, env=cli_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the lock of a run that ended without releasing it" in third.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in third.stderr
    assert (out / "checkpoint-0.pth").is_file() and not (out / LOCK_NAME).exists()  # released at the end
    # ... and, under that lock, what the killed save left is removed and named with its size
    assert f"removed what interrupted saves left in {out}: {left.name} (2.9 MB), .saving-checkpoint-0-step2 " \
           "(2.0 KB) (2.9 MB in all)" in third.stderr
    assert not left.exists() and not (out / ".saving-checkpoint-0-step2").exists()


def _killed_save(out: Path, tmp_path: Path) -> Path:
    """Case 9 of the issue: a real save killed with SIGKILL in the middle of its write (today its
    temporary file stays, unmentioned), and a DeepSpeed save's staging folder. Returns the temporary file."""
    code = ("import time; from mcbeit.engine.checkpoint import write_atomic\n"
            "def write(f):\n"
            "    f.write(b'x' * 3_000_000); f.flush(); print('writing', flush=True); time.sleep(600)\n"
            f"write_atomic({str(out / 'checkpoint-0-step2.pth')!r}, write)\n")
    saver = _start([PYTHON, "-c", code], tmp_path)
    assert saver.stdout.readline().strip() == "writing", saver.communicate()[1][-2000:]
    saver.send_signal(signal.SIGKILL)
    saver.communicate()
    left = [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]
    assert len(left) == 1 and left[0].name.startswith(".checkpoint-0-step2.pth.") and left[0].suffix == ".tmp"
    assert left[0].stat().st_size == 3_000_000
    staging = out / ".saving-checkpoint-0-step2"
    staging.mkdir()
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"y" * 2048)
    assert sorted(orphans(out)) == sorted([left[0], staging])
    return left[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _two_ranks(images: Path, out: Path, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Two processes of one job, started as a launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    but each on its own: each one's exit status and message are its own (torchrun would stop the
    other as soon as one fails)."""
    from tests.tasks.conftest import free_port

    port, procs = str(free_port()), []
    for rank in (0, 1):
        env = cli_env(tmp_path)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(_pretrain(images, out, "--epochs", "1", "--batch_size", "4"), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outputs, strict=True)]


def test_two_processes_take_one_lock_and_a_held_folder_stops_both_ranks_at_once(images, tmp_path):
    free = _two_ranks(images, tmp_path / "free", tmp_path)
    assert [r.returncode for r in free] == [0, 0], free[0].stderr[-3000:] + free[1].stderr[-3000:]
    assert (tmp_path / "free" / "checkpoint-0.pth").is_file() and not (tmp_path / "free" / LOCK_NAME).exists()

    held = tmp_path / "held"
    holder = _hold_lock(held, tmp_path)
    try:
        started = time.monotonic()
        busy = _two_ranks(images, held, tmp_path)
        assert time.monotonic() - started < 60                     # rank 1 did not wait for rank 0 in a collective
        for rank in busy:
            assert rank.returncode == EXIT_INPUT, rank.stderr[-3000:]
            assert f"--output_dir {held} is in use by another run (pid {holder.pid} on" in rank.stderr
            assert "Traceback" not in rank.stderr and "steps per epoch" not in rank.stderr
    finally:
        holder.kill()
        holder.communicate()


def _without_dac_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set, so that
    after exec even root obeys file permissions (as every other user does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_output_folder_that_cannot_be_written_stops_before_training(images, tmp_path):
    env = cli_env(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    # Case 7 of the issue: a path under a file, and a folder without write permission while --log_dir
    # points elsewhere (today found at the first checkpoint save, after the training, or a traceback).
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    as_user = {"preexec_fn": _without_dac_override} if os.geteuid() == 0 else {}
    cases = [(["--output_dir", str(blocker / "out")], {}, f"--output_dir {blocker / 'out'} lies under {blocker}, "
                                                          "which is a file"),
             (["--output_dir", str(locked), "--log_dir", str(tmp_path / "tb")], as_user,
              f"--output_dir {locked} cannot be written (Permission denied)"),
             (["--output_dir", str(tmp_path / "fine"), "--log_dir", str(blocker / "tb")], {},
              f"--log_dir {blocker / 'tb'} lies under {blocker}, which is a file")]
    try:
        for flags, kwargs, expected in cases:
            cmd = [*_pretrain(images, "unused", "--epochs", "1"), *flags]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kwargs)
            assert proc.returncode == EXIT_INPUT, proc.stderr[-3000:]
            last = proc.stderr.strip().splitlines()[-1]
            assert expected in last, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr and "steps per epoch" not in proc.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_lock_is_taken_over_only_from_a_dead_holder_and_the_fallback_lock_file_says_so(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _hold_lock(folder, tmp_path)
    try:
        with pytest.raises(Exception, match=f"in use by another run \\(pid {holder.pid} on"):
            OutputLock.acquire(folder)
    finally:
        holder.kill()
        holder.communicate()
    lock = OutputLock.acquire(folder)                             # the kernel released the dead holder's flock
    assert f"pid {os.getpid()}" in (folder / LOCK_NAME).read_text()
    lock.release()
    assert not (folder / LOCK_NAME).exists()

    # A holder killed while a process it forked (a data-loader worker) still lives: the lock is free.
    code = ("import os, time; from mcbeit.engine.output_dir import OutputLock; "
            f"OutputLock.acquire({str(folder)!r}); child = os.fork(); "
            "time.sleep(600) if child == 0 else (print(child, flush=True), time.sleep(600))")
    parent = _start([PYTHON, "-c", code], tmp_path)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()                                             # (its pipes stay open in the child)
        assert _alive(child)
        OutputLock.acquire(folder).release()
    finally:
        os.kill(child, signal.SIGKILL)
        parent.communicate()

    # Where flock fails (some NFS), the lock file is created exclusively: a dead holder of this host
    # is recognised by its pid, a live one stops the run.
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_NAME).write_text(f"host {socket.gethostname()}\npid {dead.stdout.strip()}\nsince then\n"
                                    "command gone\n")
    lock = OutputLock.acquire(folder, use_flock=False)
    assert lock.exclusive_file and f"pid {os.getpid()}" in (folder / LOCK_NAME).read_text()
    with pytest.raises(Exception, match=f"pid {os.getpid()} on .* remove {folder / LOCK_NAME}"):
        OutputLock.acquire(folder, use_flock=False)
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_a_replaced_deepspeed_folder_is_an_orphan_only_once_its_replacement_is_in_place(tmp_path):
    aside = tmp_path / ".replaced-checkpoint-1"
    aside.mkdir()
    assert orphans(tmp_path) == []                                # still the only copy: a resume point
    (tmp_path / "checkpoint-1").mkdir()
    assert orphans(tmp_path) == [aside]
    (tmp_path / ".checkpoint-1.pth.abcdefgh.tmp").write_bytes(b"")
    (tmp_path / "checkpoint-1.pth").write_bytes(b"")               # whole files are never orphans
    assert orphans(tmp_path) == [tmp_path / ".checkpoint-1.pth.abcdefgh.tmp", aside]
