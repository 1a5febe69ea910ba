"""The pieces of stopping on signals (issue 14, cases 1 and 2), each with real signals and processes:
the process's stop handlers, data-loader workers that ignore stop signals, and mcbeit-torchrun's
reading of its workers' exit statuses. End to end: tests/tasks/test_group_signals.py."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from mcbeit.data.samplers import build_train_loader, loader_worker_init
from mcbeit.engine.control import StopSignals
from mcbeit.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED
from mcbeit.launch import DEFAULT_SHUTDOWN_TIMEOUT, WorkerRecords, _torchrun_signals, get_args_parser

REPO = Path(__file__).resolve().parents[2]
STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def test_a_stop_signal_is_recorded_and_a_second_sigint_stops_at_once():
    stops = StopSignals()
    before = signal.getsignal(signal.SIGTERM)
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)   # handled in this (the main) thread before kill returns to Python
        assert stops.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)   # a launcher's forwarded copy: ignored
        assert stops.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while stopping: at once
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    stops.install()                             # a new run in the same process starts clean
    try:
        assert stops.received is None
        os.kill(os.getpid(), signal.SIGINT)     # the first Ctrl-C is a graceful stop
        assert stops.received == "SIGINT"
    finally:
        stops.uninstall()


def test_stop_handlers_nest_and_the_outermost_uninstall_restores():
    stops, before = StopSignals(), signal.getsignal(signal.SIGINT)
    stops.install()
    stops.install()                             # the command line's, then RunControl's
    stops.uninstall()
    assert signal.getsignal(signal.SIGINT) == stops._on_signal
    stops.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


class _Dispositions(Dataset):
    """Item i: the loader worker's pid and its handlers of the stop signals (1 when ignored)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, item):
        return torch.tensor([os.getpid(), *[int(signal.getsignal(s) == signal.SIG_IGN) for s in STOPS]])


def _mark(worker_id: int) -> None:
    os.environ["MCBEIT_TEST_INIT_RAN"] = str(worker_id)


class _InitRan(_Dispositions):
    def __getitem__(self, item):
        return torch.tensor([int(os.environ.get("MCBEIT_TEST_INIT_RAN", "-1"))])


def test_loader_workers_ignore_stop_signals_and_survive_a_real_sigterm():
    loader, sampler, _ = build_train_loader(_Dispositions(), batch_size=4, num_workers=1, pin_memory=False, seed=0,
                                            world_size=1, rank=0)
    sampler.set_epoch(0)
    batches = iter(loader)
    first = next(batches)
    assert first[:, 1:].eq(1).all()                           # SIGTERM, SIGUSR1, SIGINT ignored
    worker = int(first[0, 0])
    assert worker != os.getpid()
    os.kill(worker, signal.SIGTERM)                           # what a group SIGTERM does to it
    rest = [batch for batch in batches]
    assert len(rest) == 15 and all(int(b[0, 0]) == worker for b in rest)   # the same worker, alive


def test_loader_worker_init_runs_the_init_function_it_wraps():
    from torch.utils.data import DataLoader

    loader = DataLoader(_InitRan(), batch_size=4, num_workers=1, worker_init_fn=loader_worker_init(_mark))
    assert int(next(iter(loader))[0, 0]) == 0


_RESET_WHILE_SHARING = """
import os, socket, sys, time
from multiprocessing import resource_sharer
if sys.argv[1] == "worker":
    from mcbeit.data.samplers import loader_worker_init
    loader_worker_init()(0)
r, w = os.pipe()
address = resource_sharer.DupFd(r)._id[0]        # what a worker does to hand a batch's memory over
s = socket.socket(socket.AF_UNIX)
s.connect(address)                               # the reader comes for it ...
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes([1, 0, 0, 0, 0, 0, 0, 0]))
s.close()                                        # ... and is gone at once (a second Ctrl-C)
time.sleep(0.5)
raise ConnectionResetError("any other error is still reported")
"""


def test_a_worker_whose_reader_stopped_at_once_prints_no_traceback_for_the_abandoned_batch():
    """CI caught this once: a second Ctrl-C while a rank collected a batch printed multiprocessing's
    resource_sharer traceback from the worker; the worker now drops that one error, and only it."""
    plain, worker = (subprocess.run([sys.executable, "-c", _RESET_WHILE_SHARING, kind], capture_output=True,
                                    text=True, timeout=60) for kind in ("plain", "worker"))
    assert "resource_sharer.py" in plain.stderr                    # what Python prints by default
    assert "resource_sharer.py" not in worker.stderr, worker.stderr
    assert "any other error is still reported" in worker.stderr and worker.returncode == 1


def test_every_data_loader_of_the_package_ignores_stop_signals():
    """Pre-training, fine-tuning / linear probing and tokenizer training (VQ-VAE, VQ-KD) build their loaders with
    build_train_loader / build_eval_loader; any DataLoader built elsewhere must pass the same init."""
    for path in (REPO / "mcbeit").rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"\bDataLoader\(", text):
            args = text[call.end():text.find("\n\n", call.end())]
            assert "worker_init_fn=loader_worker_init(" in args, f"{path}: {text[call.start():call.start() + 120]}"
    for where in ("engine/task.py", "tasks/finetune.py"):          # Task.image_training_data, fine-tuning's
        assert "build_train_loader(" in (REPO / "mcbeit" / where).read_text()
    for task in ("pretrain", "tokenizer", "vqkd"):
        assert "self.image_training_data(" in (REPO / "mcbeit" / "tasks" / f"{task}.py").read_text()


def _records(folder: Path, **files: str) -> WorkerRecords:
    for name, value in files.items():
        (folder / name.replace("_", "-", 1).replace("_", ".")).write_text(value)
    return WorkerRecords(folder)


def test_the_launchers_status_after_a_stop_comes_from_the_newest_workers_records(tmp_path):
    def records(**files):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        return _records(folder, **files)

    assert records(**{"0_0_pid": "11", "0_0_exit": "75", "0_1_pid": "12", "0_1_exit": "75"}).status_after_stop() == 75
    assert records(**{"0_0_pid": "11", "0_0_exit": "75", "0_1_pid": "12", "0_1_exit": "0"}).status_after_stop() == 75
    assert records(**{"0_0_pid": "11", "0_0_exit": "0"}).status_after_stop() == EXIT_OK
    assert records(**{"0_0_pid": "11", "0_0_exit": "130", "0_1_pid": "12", "0_1_exit": "75"}).status_after_stop() \
        == EXIT_INTERRUPTED
    killed = records(**{"0_0_pid": "11", "0_0_exit": "75", "0_1_pid": "12"})          # rank 1 left no status
    assert killed.status_after_stop() is None and killed.running() == [12]
    assert records(**{"0_0_pid": "11", "0_0_exit": "1"}).status_after_stop() is None
    assert records().status_after_stop() is None                                      # no mcbeit worker started
    # after a restart (a killed rank), only the new group's records count
    restarted = records(**{"0_0_pid": "11", "0_1_pid": "12", "0_0_exit": "5", "1_0_pid": "21", "1_1_pid": "22",
                           "1_0_exit": "75", "1_1_exit": "75"})
    assert restarted.status_after_stop() == EXIT_PREEMPTED


def test_the_launchers_defaults_and_the_signals_it_leaves_to_torchrun(monkeypatch):
    for name in ("PET_SIGNALS_TO_HANDLE", "PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    args = get_args_parser().parse_args(["script.py"])
    assert "SIGUSR1" in args.signals_to_handle.split(",") and args.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    assert _torchrun_signals(args.signals_to_handle) == "SIGHUP,SIGQUIT"
    assert get_args_parser().parse_args(["--shutdown_timeout", "7", "script.py"]).shutdown_timeout == 7
    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "9")          # torchrun's environment variables still win
    assert int(get_args_parser().parse_args(["script.py"]).shutdown_timeout) == 9


@pytest.mark.parametrize("code, expected", [(75, 75), (3, 1)])
def test_the_launcher_exits_75_when_every_worker_did_and_with_torchruns_status_otherwise(tmp_path, code, expected):
    """Workers that are not mcbeit commands (no records): the launcher reads torchrun's ChildFailedError."""
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mcbeit.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           "--monitor_interval=0.1", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == expected, done.stderr[-3000:]
    assert (f"exit {EXIT_PREEMPTED}" in done.stderr) == (code == EXIT_PREEMPTED)


HANGS_AFTER_A_SECOND_CTRL_C = """
import os, sys, threading, time
from mcbeit.engine import checkpoint, control
control.HARD_EXIT_AFTER_S = 1.0
control.stop_signals.install(hard_exit=True)
tmp = sys.argv[1]
open(tmp, "wb").write(b"half a checkpoint")
checkpoint.WRITING.add(tmp)             # a write in progress
held = threading.Lock()
held.acquire()                          # a lock the interrupted code never gives back
print("ready", flush=True)
try:
    while True:
        time.sleep(0.01)
finally:
    held.acquire()                      # the unwinding waits on it for good
"""


def test_a_process_that_cannot_unwind_after_a_second_ctrl_c_is_ended_by_the_watchdog(tmp_path):
    """A second Ctrl-C raises KeyboardInterrupt; when the unwinding hangs (a lock left held), the watchdog ends
    the process with 130 a moment later and removes the checkpoint write in progress."""
    script, tmp = tmp_path / "hang.py", tmp_path / ".checkpoint-3.pth.abc.tmp"
    script.write_text(HANGS_AFTER_A_SECOND_CTRL_C)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)     # the first: recorded
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)     # the second: KeyboardInterrupt, then the hang
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == EXIT_INTERRUPTED, err
    assert "still running 1 s after the second Ctrl-C: exiting now (status 130" in err
    assert not tmp.exists()


def test_the_watchdog_is_armed_only_for_a_command_lines_process():
    """In-process runs (tests, notebooks) keep KeyboardInterrupt alone: no timer may end the caller's process."""
    import mcbeit.engine.control as control

    stops = StopSignals()
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stops.uninstall()
    assert control._watchdog is None
