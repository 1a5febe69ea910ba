import argparse
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mcbeit.config.fields import as_flags
from mcbeit.engine import checkpoint as ck
from tests.tasks.conftest import REPO


def test_save_atomic_round_trip_with_weights_only(tmp_path):
    args = argparse.Namespace(lr=1e-3, opt_betas=[0.9, 0.98], data_path=None, model="m", device=torch.device("cpu"))
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "args": as_flags(args)}
    path = ck.save_atomic(state, tmp_path / "checkpoint-3.pth")
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["args"] == {"lr": 1e-3, "opt_betas": [0.9, 0.98], "data_path": None, "model": "m", "device": "cpu"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3.pth"]  # no temporary left behind


def test_failed_save_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint-0.pth"
    ck.save_atomic({"model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ck.save_atomic({"model": {"w": torch.zeros(2)}, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth"]


def test_latest_checkpoint_orders_by_epoch_number_not_name(tmp_path):
    for epoch in (2, 10, 9):
        ck.save_atomic({"model": {}}, ck.checkpoint_path(tmp_path, epoch))
    (tmp_path / "checkpoint-best.pth").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [e for e, _ in ck.list_checkpoints(tmp_path)] == [2, 9, 10]
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-10.pth"
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_load_training_checkpoint_rejects_other_files(tmp_path):
    p = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(1)}, p)
    with pytest.raises(RuntimeError, match="not a training checkpoint"):
        ck.load_training_checkpoint(p)
    with pytest.raises(FileNotFoundError):
        ck.load_training_checkpoint(tmp_path / "nope.pth")


def _state(seed: int) -> dict:
    """A checkpoint-shaped dict big enough that the middle of the file is tensor data (~400 kB)."""
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(100_000, generator=g)}, "epoch": seed, "args": {"seed": seed}}


def test_damaged_newest_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    for epoch in (1, 3, 5, 7):
        ck.save_atomic(_state(epoch), ck.checkpoint_path(tmp_path, epoch))
    assert ck.checkpoint_problem(ck.checkpoint_path(tmp_path, 7)) is None
    # 7: truncated (a kill during a non-atomic copy); 5: one flipped byte in the tensor data; 3: empty.
    seven = ck.checkpoint_path(tmp_path, 7)
    seven.write_bytes(seven.read_bytes()[: seven.stat().st_size // 2])
    five = ck.checkpoint_path(tmp_path, 5)
    data = bytearray(five.read_bytes())
    data[len(data) // 2] ^= 0xFF
    five.write_bytes(bytes(data))
    ck.checkpoint_path(tmp_path, 3).write_bytes(b"")
    assert "truncated" in ck.checkpoint_problem(seven)
    assert "CRC" in ck.checkpoint_problem(five)
    assert ck.checkpoint_problem(ck.checkpoint_path(tmp_path, 3)) == "empty file"
    with caplog.at_level("WARNING"):
        good = ck.latest_good_checkpoint(tmp_path)
    assert good == ck.checkpoint_path(tmp_path, 1)
    assert torch.load(good, weights_only=True)["epoch"] == 1
    skipped = [r.getMessage() for r in caplog.records if "auto-resume: skipping" in r.getMessage()]
    assert [m.split()[2] for m in skipped] == [f"{tmp_path}/checkpoint-{e}.pth:" for e in (7, 5, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{e}.pth" for e in (1, 3, 5, 7)]  # nothing deleted


def test_resume_path_falls_back_and_refuses_a_damaged_explicit_file(tmp_path):
    from mcbeit.engine.resume import resume_path
    from mcbeit.errors import InputError

    for epoch in (0, 1):
        ck.save_atomic(_state(epoch), ck.checkpoint_path(tmp_path, epoch))
    newest = ck.checkpoint_path(tmp_path, 1)
    newest.write_bytes(newest.read_bytes()[:1000])
    args = argparse.Namespace(resume="", auto_resume=True, output_dir=str(tmp_path))
    assert resume_path(**vars(args)) == str(ck.checkpoint_path(tmp_path, 0))
    with pytest.raises(InputError, match=r"--resume .*checkpoint-1.pth: truncated.*pass an earlier checkpoint"):
        resume_path(resume=str(newest), auto_resume=True, output_dir=str(tmp_path))
    ck.checkpoint_path(tmp_path, 0).write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="every checkpoint in .* is damaged"):
        resume_path(**vars(args))


def test_keep_last_prunes_only_after_a_safe_write_and_never_later_epochs(tmp_path):
    from mcbeit.engine.checkpoint import save_checkpoint

    args = dict(output_dir=str(tmp_path), keep_last=2)
    (tmp_path / "checkpoint-best.pth").write_bytes(b"best")
    for epoch in range(5):
        save_checkpoint(args["output_dir"], epoch, _state(epoch), args["keep_last"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-best.pth"]
    # A run resumed from epoch 3 (4 was damaged) writes 4 again: 9 from an older run is left alone.
    ck.save_atomic(_state(9), ck.checkpoint_path(tmp_path, 9))
    save_checkpoint(args["output_dir"], 4, _state(4), args["keep_last"])
    assert [e for e, _ in ck.list_checkpoints(tmp_path)] == [3, 4, 9]
    save_checkpoint(str(tmp_path), 5, _state(5), keep_last=0)
    assert [e for e, _ in ck.list_checkpoints(tmp_path)] == [3, 4, 5, 9]  # 0 keeps all


def test_a_write_that_runs_out_of_space_says_so_and_keeps_the_old_file(tmp_path):
    path = ck.checkpoint_path(tmp_path, 0)
    ck.save_atomic(_state(0), path)
    before = path.read_bytes()

    def write_then_fill_the_disk(f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ck.CheckpointWriteError, match=r"no space left on the device; the previous checkpoint-0.pth "
                                                       r"is untouched \(the partial file was removed\)"):
        ck.write_atomic(path, write_then_fill_the_disk)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint-0.pth"]


def test_a_real_process_hitting_a_file_size_limit_fails_loudly_and_harms_nothing(tmp_path):
    """A real failing write: the saving process runs under RLIMIT_FSIZE, so the kernel refuses the write."""
    path = ck.checkpoint_path(tmp_path, 2)
    ck.save_atomic(_state(1), path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from mcbeit.engine import checkpoint as ck
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        ck.save_atomic({{"model": {{"w": torch.randn(200_000)}}, "epoch": 2}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "CheckpointWriteError" in proc.stderr and "the previous checkpoint-2.pth is untouched" in proc.stderr
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint-2.pth"]


def test_a_legacy_format_checkpoint_resumes(tmp_path):
    """torch's pre-zip format has no checksums to verify: it is not mistaken for a damaged file, and
    --resume loads it (with weights_only=True, like any other)."""
    from argparse import Namespace

    from mcbeit.engine.resume import resume_path

    path = ck.checkpoint_path(tmp_path, 4)
    torch.save(_state(4), path, _use_new_zipfile_serialization=False)
    assert ck.checkpoint_problem(path) is None
    assert resume_path(**vars(Namespace(resume=str(path), auto_resume=False, output_dir=""))) == str(path)
    assert resume_path(**vars(Namespace(resume="", auto_resume=True, output_dir=str(tmp_path)))) == str(path)
    assert torch.equal(ck.load_training_checkpoint(path)["model"]["w"], _state(4)["model"]["w"])


# -- positions in names (issue 14, case 10), superseded mid-epoch files, the user's umask --------------------

def _position(epoch: int, done: int, steps_per_epoch: int = 8) -> dict:
    """A checkpoint's position record (the entries :func:`mcbeit.engine.resume.position_state` writes)."""
    return {"model": {"w": torch.full((2,), float(epoch * 100 + done))}, "epoch": epoch, "step_in_epoch": done,
            "steps_per_epoch": steps_per_epoch, "global_step": epoch * steps_per_epoch + done}


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_mid_epoch_checkpoints_say_their_position_and_go_once_a_newer_one_is_on_disk(tmp_path):
    assert ck.checkpoint_path(tmp_path, 0, 3).name == "checkpoint-0-step3.pth"
    assert ck.checkpoint_path(tmp_path, 0).name == "checkpoint-0.pth"
    assert ck.position_key("checkpoint-0-step3.pth") == (0, 3) and ck.position_key("checkpoint-2") == (2, ck.END)
    assert ck.position_key("checkpoint-best.pth") is None

    ck.save_checkpoint(tmp_path, "0-step3", _position(0, 3))
    ck.save_checkpoint(tmp_path, "0-step6", _position(0, 6))       # supersedes step 3
    assert _names(tmp_path) == ["checkpoint-0-step6.pth"]
    ck.save_checkpoint(tmp_path, 0, _position(0, 8))               # the epoch's end supersedes every mid-epoch one
    ck.save_checkpoint(tmp_path, "1-step4", _position(1, 4))
    ck.save_checkpoint(tmp_path, "best", {"model": {}})            # not a position: nothing goes
    assert _names(tmp_path) == ["checkpoint-0.pth", "checkpoint-1-step4.pth", "checkpoint-best.pth"]
    assert ck.latest_checkpoint(tmp_path).name == ck.latest_good_checkpoint(tmp_path).name == "checkpoint-1-step4.pth"
    assert [key for key, _ in ck.list_resume_points(tmp_path)] == [(0, ck.END), (1, 4)]
    assert [e for e, _ in ck.list_checkpoints(tmp_path)] == [0]     # what --keep_last counts

    # --keep_last counts epoch checkpoints; a later position left by an earlier resume stays
    ck.save_checkpoint(tmp_path, "3-step1", _position(3, 1))
    for epoch in (1, 2):
        ck.save_checkpoint(tmp_path, epoch, _position(epoch, 8), keep_last=1)
    assert _names(tmp_path) == ["checkpoint-2.pth", "checkpoint-3-step1.pth", "checkpoint-best.pth"]


def test_the_newest_position_is_resumed_and_a_damaged_one_falls_back_to_the_previous(tmp_path, caplog):
    from mcbeit.engine.resume import resume_path

    ck.save_checkpoint(tmp_path, 4, _position(4, 8))
    ck.save_atomic(_position(5, 2), ck.checkpoint_path(tmp_path, 5, 2))
    ck.save_atomic(_position(5, 10), ck.checkpoint_path(tmp_path, 5, 10))  # step 10 after step 2, not before
    assert resume_path("", True, str(tmp_path)) == str(tmp_path / "checkpoint-5-step10.pth")
    ck.checkpoint_path(tmp_path, 5, 10).write_bytes(b"\0" * 10)
    with caplog.at_level("WARNING"):
        assert resume_path("", True, str(tmp_path)) == str(tmp_path / "checkpoint-5-step2.pth")
    assert "skipping" in caplog.text and "checkpoint-5-step10.pth" in caplog.text


def test_an_epoch_named_checkpoint_of_an_earlier_version_holding_a_mid_epoch_position_is_ordered_by_it(tmp_path):
    # Earlier versions wrote mid-epoch positions as checkpoint-<epoch>.pth (issue 14: a step-21 state).
    ck.save_atomic(_position(0, 5), ck.checkpoint_path(tmp_path, 0))
    ck.save_atomic(_position(0, 3), ck.checkpoint_path(tmp_path, 0, 3))
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-0.pth"          # step 5 is after step 3
    ck.save_checkpoint(tmp_path, "0-step6", _position(0, 6))                  # a resumed run goes on ...
    assert _names(tmp_path) == ["checkpoint-0-step6.pth"]                     # ... and supersedes both
    ck.save_atomic(_position(0, 8), ck.checkpoint_path(tmp_path, 0))          # a whole epoch under its name
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-0.pth"


def test_the_legacy_fixture_resumes_under_the_new_names(tmp_path):
    """tests/fixtures/legacy_017d8f5 (written by 017d8f5, before positions were in names) is found and resumed."""
    import shutil
    from pathlib import Path

    from mcbeit.engine.resume import resume_path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_017d8f5"
    shutil.copy(fixture / "checkpoint-1.pth", tmp_path / "checkpoint-1.pth")
    assert resume_path("", True, str(tmp_path)) == str(tmp_path / "checkpoint-1.pth")
    assert [key for key, _ in ck.list_resume_points(tmp_path)] == [(1, ck.END)]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644)])
def test_checkpoints_and_exported_weights_get_the_users_umask(tmp_path, umask, mode):
    """Issue 14: checkpoints and exported weights were 0600 whatever the umask (tempfile.mkstemp in
    write_atomic; safetensors' save_file, also under transformers' save_pretrained)."""
    code = textwrap.dedent(f"""
        import os, sys
        os.umask({umask:#o})
        import torch
        from mcbeit.cli.export import main
        from mcbeit.engine.checkpoint import save_checkpoint
        from tests.models.test_export import make_finetuned
        out = sys.argv[1]
        save_checkpoint(out + "/run", "0-step1", {{"model": {{"w": torch.ones(2)}}}})
        save_checkpoint(out + "/run", 0, {{"model": {{"w": torch.ones(2)}}}})
        path, _, _ = make_finetuned(out + "/ft.pth")
        assert main([str(path), "--output", out + "/exported", "--hf", "--no_verify"]) == 0
    """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    written = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert {"run/checkpoint-0.pth", "exported/model.safetensors", "exported/hf/model.safetensors"} <= set(written)
    assert written == dict.fromkeys(written, mode), written


@pytest.mark.usefixtures("one_thread")
def test_a_real_run_names_its_mid_epoch_checkpoints_by_position(tmp_path):
    """Issue 14, case 10: today a mid-epoch checkpoint is written as checkpoint-<epoch>.pth (a step-3
    state under epoch 0's name). Every checkpoint file is hard-linked aside the moment it appears."""
    import os
    import threading
    import time

    from mcbeit.cli import pretrain
    from tests.tasks.conftest import FAST, make_image_folder

    images = make_image_folder(tmp_path / "images", n_per_class=8, size=64)   # 32 images: 4 steps of 8
    out, seen = tmp_path / "out", tmp_path / "seen"
    seen.mkdir()
    running = threading.Event()
    running.set()

    def keep_each_checkpoint():
        while running.is_set():
            for path in out.glob("checkpoint-*.pth") if out.is_dir() else []:
                if not (seen / path.name).exists():
                    try:
                        os.link(path, seen / path.name)
                    except FileNotFoundError:  # superseded in between: the next one is kept
                        pass
            time.sleep(0.002)

    watcher = threading.Thread(target=keep_each_checkpoint, daemon=True)
    watcher.start()
    argv = ["--data_path", str(images), "--output_dir", str(out), "--device", "cpu", *FAST, "--batch_size", "8",
            "--warmup_epochs", "0", "--epochs", "2", "--save_ckpt_steps", "3", "--save_ckpt_freq", "5"]
    try:
        pretrain.run(pretrain.get_args_parser().parse_args(argv))
    finally:
        running.clear()
        watcher.join()
    # steps 3 and 6 (= epoch 1, step 2) inside epochs; epoch 1's end; epoch 0's end is not due (freq 5)
    assert _names(seen) == ["checkpoint-0-step3.pth", "checkpoint-1-step2.pth", "checkpoint-1.pth"]
    positions = {p.name: (c["epoch"], c["step_in_epoch"]) for p in seen.iterdir()
                 if (c := torch.load(p, weights_only=True))}
    assert positions == {"checkpoint-0-step3.pth": (0, 3), "checkpoint-1-step2.pth": (1, 2), "checkpoint-1.pth": (1, 4)}
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1.pth"]  # the mid-epoch ones were superseded


class _InterruptedFile:
    """A file whose third write is hit by Ctrl-C, as a signal handler raising KeyboardInterrupt would be."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def write(self, data):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_ctrl_c_during_a_checkpoint_write_is_an_interrupt_not_a_write_error(tmp_path):
    """A second Ctrl-C can land inside torch.save: its zip writer then fails on closing ('unexpected pos'),
    which reads like a full disk. The caller gets the KeyboardInterrupt, the old file stays and the partial one
    goes (CI once printed a CheckpointWriteError traceback here)."""
    path = ck.checkpoint_path(tmp_path, 0)
    ck.save_atomic(_state(0), path)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt) as info:
        ck.write_atomic(path, lambda f: torch.save({"w": torch.randn(100_000), "v": torch.randn(1000)},
                                                   _InterruptedFile(f)))
    assert not isinstance(info.value.__context__, ck.CheckpointWriteError)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint-0.pth"]
