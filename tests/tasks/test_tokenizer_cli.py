"""`mcbeit-tokenizer train | inspect`, `run_tokenizer_training.py`, and pre-training with a trained tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mcbeit.cli import pretrain
from mcbeit.cli import tokenizer as tok_task
from mcbeit.cli.common import to_config
from tests.tasks.conftest import FAST, PYTHON, make_image_folder, run_cli

TINY_TRAIN = ["--device", "cpu", "--input_size", "32", "--vocab_size", "64", "--embed_dim", "8", "--hidden", "8",
              "--batch_size", "16", "--num_workers", "0", "--print_freq", "2", "--lr", "3e-3", "--warmup_epochs", "0",
              "--dead_code_steps", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tokcli"), n_per_class=16, size=64, seed=2)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokrun")
    assert tok_task.main(["train", "--data_path", str(data), "--output_dir", str(out), "--epochs", "3", *TINY_TRAIN]) == 0
    return out / "checkpoint-2.pth"


def parse(argv):
    return tok_task.resolve_train_defaults(tok_task.get_train_parser().parse_args(argv))


def test_train_defaults_are_the_embedded_run_and_a_real_run_otherwise():
    emb = parse([])
    assert emb.data_path is None and emb.output_dir == "./output/mcbeit_tokenizer" and emb.auto_resume
    assert (emb.vocab_size, emb.input_size, emb.epochs, emb.batch_size) == (1024, 112,
                                                                         tok_task.EMBEDDED_DEFAULTS["epochs"], 32)
    real = parse(["--data_path", "x"])
    assert (real.vocab_size, real.epochs, real.batch_size) == (8192, 100, 64)
    assert parse(["--vocab_size", "512", "--no_auto_resume"]).vocab_size == 512
    assert parse(["--local-rank", "2"]).local_rank == 2 and parse(["--local_rank", "1"]).local_rank == 1
    for bad, message in ((["--input_size", "100"], "multiple of 8"), (["--vocab_size", "1"], "vocab_size"),
                         (["--epochs", "0"], "epochs")):
        with pytest.raises(SystemExit, match=message):
            parse(bad)
    sub = tok_task.get_args_parser().parse_args(["train", "--epochs", "2"])
    assert sub.command == "train" and sub.epochs == 2
    assert to_config(tok_task.get_args_parser().parse_args(["inspect"])).num_images == 8  # flags not given: defaults


def test_resume_refuses_a_pretraining_checkpoint(data, tmp_path):
    torch.save({"format": "mcbeit-pretrain-v1", "model": {}, "epoch": 0}, tmp_path / "pre.pth")
    with pytest.raises(SystemExit, match="not a checkpoint of mcbeit-tokenizer train"):
        tok_task.run_train(tok_task.get_train_parser().parse_args(
            ["--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--epochs", "1",
             "--resume", str(tmp_path / "pre.pth"), *TINY_TRAIN]))


def test_inspect_trained_tokenizer_writes_grid_with_reconstructions_and_histogram(data, checkpoint, tmp_path, capfd):
    out = tmp_path / "inspect" / "grid.png"
    assert tok_task.main(["inspect", "--discrete_vae_weight_path", str(checkpoint), "--data_path", str(data),
                          "--input_size", "32", "--num_images", "5", "--histogram_images", "40",
                          "--output", str(out), "--device", "cpu"]) == 0
    said = capfd.readouterr().err
    assert "codes used" in said and "perplexity" in said
    with Image.open(out) as grid:
        assert grid.size == (96 + 5 * (32 + 4) + 4, 18 + 3 * (32 + 4) + 4)  # rows: image, token ids, reconstruction
    with Image.open(tok_task.histogram_path(out)) as hist:
        assert hist.size == (900, 40 + 2 * 160 + 30 + 30)
    result = tok_task.run_inspect(tok_task.get_inspect_parser().parse_args(
        ["--discrete_vae_weight_path", str(checkpoint), "--data_path", str(data), "--input_size", "32",
         "--num_images", "2", "--histogram_images", "40", "--output", str(tmp_path / "again.png"), "--device", "cpu"]))
    assert result["tokens"] == 40 * 16 and result["counts"].sum() == 40 * 16
    counts = torch.as_tensor(result["counts"], dtype=torch.float64)
    share = counts[counts > 0] / counts.sum()
    assert result["codes_used"] == int((counts > 0).sum()) >= 1  # the codes the histogram counted
    assert result["perplexity"] == pytest.approx(float(torch.exp(-(share * share.log()).sum())), rel=1e-5)
    assert result["has_decoder"] and 0 <= result["grid_rec_mse"] < 0.1


def test_inspect_random_tokenizer_without_decoder_shows_token_maps_only(data, tmp_path, capfd):
    out = tmp_path / "random.png"
    result = tok_task.run_inspect(tok_task.get_inspect_parser().parse_args(
        ["--data_path", str(data), "--input_size", "32", "--num_images", "3", "--histogram_images", "16",
         "--output", str(out), "--device", "cpu"]))
    assert not result["has_decoder"] and result["vocab_size"] == 8192
    assert "no decoder" in capfd.readouterr().err
    with Image.open(out) as grid:
        assert grid.size == (96 + 3 * (32 + 4) + 4, 18 + 2 * (32 + 4) + 4)  # rows: image, token ids
    with Image.open(tok_task.histogram_path(out)) as hist:
        assert hist.size == (900, 420)


def test_pretraining_uses_the_trained_tokenizer(data, checkpoint, tmp_path):
    out = tmp_path / "pre"
    args = pretrain.get_args_parser().parse_args(
        ["--data_path", str(data), "--output_dir", str(out), "--device", "cpu", *FAST, "--batch_size", "16",
         "--epochs", "2", "--discrete_vae_type", "customized", "--discrete_vae_weight_path", str(checkpoint)])
    stats = pretrain.run(args)
    assert stats["epoch"] == 1 and 0 <= stats["train_mlm_acc"] <= 1
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert ckpt["model"]["lm_head.weight"].shape[0] == 64  # the tokenizer's vocabulary


def test_two_process_training_with_torchrun(data, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    run_cli([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={port}", "run_tokenizer_training.py", "--data_path", str(data), "--output_dir", str(out),
             "--epochs", "1", *TINY_TRAIN], tmp_path)
    (rec,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert rec["train_steps"] == 2 and rec["train_epoch_codes_used"] > 1  # 64 images / (16 per process x 2)
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2
    torch.testing.assert_close(ckpt["model"]["tokenizer.codebook"].norm(dim=1), torch.ones(64))
