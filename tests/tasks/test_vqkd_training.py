"""VQ-KD training end to end on the embedded images, with a teacher that is a real checkpoint of this
package (a random-init beit_tiny_patch16_224_8k_vocab written by the engine's checkpoint writer): usage and
reconstruction cosine reported and improving, bit-exact resume, 2 gloo processes with identical codebooks,
and unilm's README command line (paths and sizes changed)."""
from __future__ import annotations

import json
import shlex
import shutil

import pytest
import timm
import torch

import mcbeit.models  # noqa: F401  (registers beit_tiny_patch16_224_8k_vocab)
from mcbeit.cli import tokenizer as tok_cli
from mcbeit.engine.checkpoint import save_atomic
from mcbeit.tokenizers import build_tokenizer, build_vqkd_tokenizer
from tests.tasks.conftest import PYTHON, free_port, make_image_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = "beit_tiny_patch16_224_8k_vocab"
# 32 px: 2x2 tokens; 1000 embedded images / batch 100 = 10 steps per epoch.
FAST = ["--input_size", "32", "--teacher_input_size", "32", "--model", "vqkd_encoder_tiny_decoder_1x192x3",
        "--teacher_model_type", TEACHER, "--codebook_n_emd", "64", "--batch_size", "100", "--lr", "2e-3",
        "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "2", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A real checkpoint of this package: {'model': state dict} written by the engine's atomic writer."""
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, img_size=32, vocab_size=1024)  # pre-trained against a 1,024-code tokenizer
    path = tmp_path_factory.mktemp("teacher") / "checkpoint-0.pth"
    save_atomic({"model": model.state_dict(), "epoch": 0}, path)
    return path


def _args(out, teacher_file, *extra):
    argv = ["--output_dir", str(out), "--teacher_weight", str(teacher_file), *FAST, *extra]
    return tok_cli.get_vqkd_parser().parse_args(argv)


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_trains_reports_usage_and_cosine_and_resumes_bit_for_bit(teacher_file, tmp_path, capfd):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ["--epochs", "5", "--save_ckpt_freq", "1", "--quantize_kmeans_init", "--dead_code_steps", "5"]
    tok_cli.run_vqkd(_args(whole, teacher_file, *extra))
    log = _log(whole)
    first, last = log[0], log[-1]
    err = capfd.readouterr().err
    with capfd.disabled():
        print("VQ-KD figures per epoch:", [(r["epoch"], round(r["train_rec_cosine"], 3), r["train_epoch_codes_used"],
                                            round(r["train_epoch_perplexity"], 1), r["train_unused_code"])
                                               for r in log])
    assert last["train_rec_cosine"] > first["train_rec_cosine"] + 0.05         # reconstructs the teacher better
    assert last["train_epoch_perplexity"] > first["train_epoch_perplexity"]    # and spreads over more codes
    assert last["train_epoch_codes_used"] >= 48                                # of 64
    assert "LR = 0.00156250 (--lr 0.002 x total batch 100 / 128)" in err
    assert "rec cosine" in err and "codes used" in err and "perplexity" in err      # the epoch line reports them

    # The checkpoint is a tokenizer file as it is (unilm layout under 'model', no teacher keys).
    ckpt = torch.load(whole / "checkpoint-4.pth", weights_only=True)
    assert not [k for k in ckpt["model"] if k.startswith(("teacher", "scaling"))]
    tok = build_tokenizer("vqkd", str(whole / "checkpoint-4.pth"), 32)
    assert tok.vocab_size == 64 and not tok.random_weights
    assert build_vqkd_tokenizer(str(whole / "checkpoint-4.pth"), 32, codebook_size=64).token_ids(
        torch.zeros(1, 3, 32, 32)).shape == (1, 4)

    resumed.mkdir()
    shutil.copy(whole / "checkpoint-2.pth", resumed / "checkpoint-2.pth")
    tok_cli.run_vqkd(_args(resumed, teacher_file, *extra))                     # auto-resume after epoch 2
    a = torch.load(whole / "checkpoint-4.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-4.pth", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["vqkd_unused_steps"], b["vqkd_unused_steps"])
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def test_eval_data_path_is_evaluated_after_every_epoch_as_the_original(teacher_file, tmp_path):
    """--eval_data_path: the original's evaluation view (resize / 0.875, centre crop), the model and teacher in
    eval mode; the logged test_* figures are those of the checkpoint's model on those images."""
    from mcbeit.tasks.vqkd import vqkd_eval_transform
    from mcbeit.tokenizers import VQKD
    from mcbeit.tokenizers.base import Normalize
    from mcbeit.tokenizers.teachers import build_teacher

    val = make_image_folder(tmp_path / "val", n_per_class=3, size=48, seed=5)      # 4 classes x 3 images
    out = tmp_path / "evaluated"
    tok_cli.run_vqkd(_args(out, teacher_file, "--epochs", "2", "--quantize_kmeans_init", "--eval_data_path",
                           str(val)))
    log = _log(out)
    assert [r["test_images"] for r in log] == [12, 12]
    last = log[-1]
    assert 0 < last["test_codes_used"] <= 64 and last["test_unused_code"] == 64 - last["test_codes_used"]

    model = VQKD("vqkd_encoder_tiny_decoder_1x192x3", 32, 64, teacher_dim=192).eval()
    model.load_state_dict(torch.load(out / "checkpoint-1.pth", weights_only=True)["model"])
    teacher = build_teacher(TEACHER, str(teacher_file), 32)
    view = vqkd_eval_transform(32, Normalize((0.5,) * 3, (0.5,) * 3))
    from PIL import Image
    images = torch.stack([view(Image.open(p).convert("RGB")) for p in sorted(val.rglob("*.jpg"))])
    with torch.no_grad():
        expected = model(images, teacher(images))
    assert abs(last["test_rec_cosine"] - float(expected["rec_cosine"])) < 1e-5
    assert last["test_codes_used"] == len(set(expected["ids"].flatten().tolist()))
    off = tmp_path / "disabled"
    tok_cli.run_vqkd(_args(off, teacher_file, "--epochs", "1", "--eval_data_path", str(val), "--disable_eval"))
    assert "test_images" not in _log(off)[-1]


def test_two_processes_keep_identical_codebooks(teacher_file, tmp_path):
    out = tmp_path / "two"
    val = make_image_folder(tmp_path / "val", n_per_class=2, size=48, seed=5)      # 8 images, 4 per rank
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "run_vqkd_training.py", "--output_dir", str(out),
           "--teacher_weight", str(teacher_file), *FAST, "--batch_size", "50", "--epochs", "1",
           "--quantize_kmeans_init", "--dead_code_steps", "3", "--eval_data_path", str(val)]
    proc = run_cli(cmd, tmp_path, timeout=600)
    # Each epoch end checks the ranks' codebooks are equal (it raises otherwise); the run finished.
    assert "LR = 0.00156250 (--lr 0.002 x total batch 100 / 128)" in proc.stderr
    record = _log(out)[-1]
    assert record["train_epoch_codes_used"] > 0 and 0 < record["train_rec_cosine"] <= 1
    assert record["test_images"] == 8 and 0 < record["test_rec_cosine"] <= 1      # each val image once
    model = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    assert float(model["quantize.embedding.initted"]) == 1.0


# unilm beit2/TOKENIZER.md's command, word for word.
UNILM_README = """
python -m torch.distributed.launch --nproc_per_node=8 run_vqkd_training.py \\
    --data_set image_folder \\
    --data_path /path/to/imagenet-1k/train \\
    --eval_data_path /path/to/imagenet-1k/eval \\
    --output_dir /path/to/save/your_model \\
    --log_dir /path/to/save/your_model \\
    --process_type default \\
    --train_interpolation bicubic \\
    --min_crop_scale 0.08 \\
    --model vqkd_encoder_base_decoder_3x768x12_clip \\
    --teacher_input_size 224 \\
    --codebook_n_emd 8192  \\
    --codebook_emd_dim 32 \\
    --quantize_kmeans_init \\
    --rec_loss_type cosine \\
    --batch_size 64 \\
    --opt adamw \\
    --opt_betas 0.9 0.99 \\
    --weight_decay 1e-4  \\
    --warmup_epochs 10 \\
    --epochs 100 \\
    --save_ckpt_freq 20
"""


def test_unilm_readme_command_parses_with_the_originals_values_and_runs_small(image_folder, teacher_file, tmp_path):
    argv = shlex.split(UNILM_README.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "torch.distributed.launch", "--nproc_per_node=8"]
    flags = argv[5:]
    cfg = tok_cli.resolve_defaults(tok_cli.get_vqkd_parser().parse_args(flags))
    assert (cfg.model, cfg.codebook_n_emd, cfg.codebook_emd_dim, cfg.quantize_kmeans_init, cfg.opt_betas,
            cfg.warmup_epochs, cfg.epochs, cfg.lr, cfg.teacher_kind) == \
        ("vqkd_encoder_base_decoder_3x768x12_clip", 8192, 32, True, (0.9, 0.99), 10, 100, 5e-5, "clip")
    # Paths and sizes changed: a small folder, a tiny model at 32 px, a teacher file, 1 epoch, one process.
    small = {"--data_path": str(image_folder), "--eval_data_path": str(image_folder), "--output_dir": str(tmp_path / "o"),
             "--log_dir": str(tmp_path / "o" / "tb"), "--model": "vqkd_encoder_tiny_decoder_1x192x3",
             "--teacher_input_size": "32", "--codebook_n_emd": "64", "--batch_size": "16", "--warmup_epochs": "0",
             "--epochs": "1"}
    changed = [small.get(flags[i - 1], a) if i else a for i, a in enumerate(flags)]
    run_cli([PYTHON, "run_vqkd_training.py", *changed, "--input_size", "32", "--teacher_model_type", TEACHER,
             "--teacher_weight", str(teacher_file), "--num_workers", "0", "--device", "cpu"], tmp_path, timeout=600)
    assert (tmp_path / "o" / "checkpoint-0.pth").exists()


def test_clear_errors(tmp_path, teacher_file):
    with pytest.raises(SystemExit, match="--teacher_weight"):
        tok_cli.run_vqkd(tok_cli.get_vqkd_parser().parse_args(
            ["--data_path", str(tmp_path), "--model", "vqkd_encoder_tiny_decoder_1x192x3_clip", "--output_dir", ""]))
    with pytest.raises(SystemExit, match="patch grid"):
        tok_cli.run_vqkd(_args(tmp_path / "g", teacher_file, "--input_size", "64", "--epochs", "1"))
    with pytest.raises(SystemExit, match="cannot be resized"):
        tok_cli.run_vqkd(_args(tmp_path / "r", teacher_file, "--teacher_input_size", "64", "--epochs", "1"))
    with pytest.raises(SystemExit, match="not a VQ-KD architecture"):                # mcbeit-tokenizer train routes
        tok_cli.main(["train", "--tokenizer_type", "vqkd", "--model", "not_a_vqkd", "--output_dir", ""])
