"""A run with too many unreadable files stops at the first step that decides it, after writing a
checkpoint of the steps it trained (issue 14, case 8).

One truncated JPEG among 49 files is more than --max_bad_fraction 0.01 of the epoch allows. It used
to be noticed only at a flush (every --print_freq steps, 10 by default: here, the epoch's end), and
the run then exited 4 with no checkpoint, the epoch lost. Real processes, real files (the corrupt one
is a real JPEG cut in half), the real pipeline; 1 process, and 2 with torch.distributed (gloo)
where only one rank reads the bad file.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

from mcbeit.errors import EXIT_BAD_DATA
from tests.engine.test_meter import read_scalars
from tests.tasks.conftest import FAST, PYTHON, REPO, cli_env, make_image_folder
from tests.tasks.conftest import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 6  # 48 readable images / 8 per step (the bad file's place is taken by the next one)


def _data(tmp_path):
    root = make_image_folder(tmp_path / "data", n_per_class=12, size=64)
    good = (root / "class_2" / "0003.jpg").read_bytes()
    (root / "class_2" / "bad.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG: does not decode
    return root


def _command(data, out, nproc: int) -> list[str]:
    launcher = [PYTHON] if nproc == 1 else [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                             "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [*launcher, "run_mcbeit_pretraining.py", "--data_path", str(data), "--output_dir", str(out),
            "--device", "cpu", *FAST, "--print_freq", "10", "--batch_size", str(8 // nproc), "--epochs", "2",
            "--warmup_epochs", "0"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_one_bad_file_among_fewer_than_100_stops_at_its_step_with_a_checkpoint(tmp_path, nproc):
    data, out = _data(tmp_path), tmp_path / "out"
    proc = subprocess.run(_command(data, out, nproc), cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    err = proc.stderr
    if nproc == 1:
        assert proc.returncode == EXIT_BAD_DATA, err[-3000:]
    else:  # torchrun reports its workers' statuses; both ranks stopped with the error, none hung
        assert proc.returncode != 0 and f"exitcode  : {EXIT_BAD_DATA}" in err, err[-3000:]
        assert "[rank 1] ERROR" in err and "[rank 0] ERROR" in err, err[-3000:]
    assert "bad.jpg" in err                                               # the file is named ...
    said = re.search(r"1 of \d+ images in epoch 0 so far \(step (\d) of 6: already more than the whole epoch may "
                     r"have\) \(\d.*%\) were unreadable, more than --max_bad_fraction 0.01", err)
    assert said, err[-3000:]

    # ... and the run stopped at the step that read it, after saving that step (not the epoch's end).
    skipped = read_scalars(out / "tensorboard")["data/skipped_images"]   # after each step: the epoch's so far
    assert [value for _, value in skipped] == [0.0] * (len(skipped) - 1) + [1.0]
    decided = len(skipped)                                                # steps done when it was decided
    assert skipped[-1][0] == decided - 1
    assert int(said.group(1)) == decided
    saved = re.search(r"trained so far are saved in (\S+): the same command continues", err)
    assert saved, err[-3000:]
    position = torch.load(saved.group(1), weights_only=True)
    assert (position["epoch"], position["step_in_epoch"], position["global_step"]) == (0, decided, decided)
    assert len(position["rng"]) == nproc
    assert decided < STEPS_PER_EPOCH, "this seed's shuffle reads the bad file before the epoch's last step"
    assert not (out / "checkpoint-0.pth").exists() and not (out / "log.txt").exists()  # epoch 0 never ended
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-0-step{decided}.pth"]
