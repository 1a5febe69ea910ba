"""A checkpoint written before the run engine was redesigned (mcbeit at 017d8f5, mid-epoch) still
resumes, and the resumed run trains on exactly as the old code's uninterrupted run did.

The files are in tests/fixtures/legacy_017d8f5 (make.py there says how they were written)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.fixtures.legacy_017d8f5.make import HERE, argv, make_images
from tests.fixtures.micro import register_micro


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was written with one thread: the same sums in the same order
    yield
    torch.set_num_threads(threads)


def test_checkpoint_of_017d8f5_resumes_mid_epoch_and_trains_on_as_it_did(tmp_path, one_thread, capfd):
    import run_mcbeit_pretraining

    register_micro()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(HERE / "checkpoint-1.pth", out / "checkpoint-1.pth")
    data = make_images(tmp_path / "data")
    assert run_mcbeit_pretraining.main(argv(data, HERE / "tokenizer.pth", out)) == 0
    err = capfd.readouterr().err
    assert "continuing at epoch 1, step 4" in err
    # its args name other folders (written elsewhere), but it records no list of experiment flags: not compared
    assert "does not record which flags define its experiment" in err

    old = {row["epoch"]: row for row in map(json.loads, (HERE / "log.txt").read_text().splitlines())}
    new = {row["epoch"]: row for row in map(json.loads, (out / "log.txt").read_text().splitlines())}
    assert sorted(new) == [1, 2]  # epoch 1 from its step 4, then epoch 2
    assert new[1]["train_steps"] == 4  # the steps left of epoch 1
    for key in ("train_lr", "train_weight_decay", "temp", "n_parameters", "train_steps"):
        assert new[2][key] == old[2][key], key
    for key in ("train_loss", "train_mlm_acc", "train_grad_norm"):
        assert new[2][key] == pytest.approx(old[2][key], rel=1e-5, abs=1e-7), key
    resumed = torch.load(out / "checkpoint-2.pth", weights_only=True)
    assert resumed["format"] == "mcbeit-pretrain-v1" and resumed["epoch"] == 2
    assert resumed["step_in_epoch"] == resumed["steps_per_epoch"] == 8
