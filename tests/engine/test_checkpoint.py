import argparse

import pytest
import torch

from mcbeit.engine import checkpoint as ck


def test_save_atomic_round_trip_with_weights_only(tmp_path):
    args = argparse.Namespace(lr=1e-3, opt_betas=[0.9, 0.98], data_path=None, model="m", device=torch.device("cpu"))
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "args": ck.plain_args(args)}
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
