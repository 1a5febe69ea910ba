"""BEiT v2 pre-training end to end (run_beitv2_pretraining.py / mcbeit-pretrain-beitv2): real images of the
embedded dataset through the real pipeline, a VQ-KD tokenizer file in unilm's layout, 1 and 2 processes, resume
bit for bit, unilm's checkpoint layout resumed strictly, mc-BEiT's soft targets over a VQ-KD codebook, clear errors."""
from __future__ import annotations

import argparse
import json
import re
import shlex

import pytest
import torch

import mcbeit.models  # noqa: F401
from mcbeit.cli import pretrain
from mcbeit.config import resolve
from mcbeit.config.pretrain import BeitV2PretrainConfig
from mcbeit.engine import checkpoint as ckpt_io
from mcbeit.engine.trainer import Trainer
from mcbeit.models.checkpoint import StateDictMismatchError
from mcbeit.tasks.pretrain import PretrainTask
from tests.models.test_beitv2 import UNILM_BASE_KEYS
from tests.tasks.conftest import PYTHON, free_port, run_cli
from tests.tasks.test_resume import _assert_same_state, _keep_when_written

pytestmark = pytest.mark.usefixtures("one_thread")

VQKD_MODEL = "vqkd_encoder_tiny_decoder_1x192x3_clip"
CODES = 64
# tiny cls_pt student at 64 px (4x4 patches), 6 masked; the VQ-KD tokenizer sees the same 64 px (16-px patches)
V2_FAST = ["--model", "beit_tiny_patch16_224_8k_vocab_cls_pt", "--input_size", "64", "--second_input_size", "64",
           "--num_mask_patches", "6", "--min_mask_patches_per_block", "2", "--tokenizer_model", VQKD_MODEL,
           "--codebook_size", str(CODES), "--num_workers", "0", "--print_freq", "1", "--seed", "0", "--eval_freq", "0",
           "--device", "cpu"]

# unilm beit2/PRETRAINING.md, base size, word for word
PRETRAINING_MD_COMMAND = """
python -m torch.distributed.launch --nproc_per_node=16 run_beitv2_pretraining.py \\
        --data_set image_folder \\
        --data_path /path/to/imagenet-1k/train \\
        --output_dir /path/to/save/your_model \\
        --log_dir /path/to/save/your_model \\
        --model beit_base_patch16_224_8k_vocab_cls_pt \\
        --shared_lm_head True \\
        --early_layers 9 \\
        --head_layers 2 \\
        --num_mask_patches 75 \\
        --second_input_size 224 \\
        --second_interpolation bicubic \\
        --min_crop_scale 0.2 \\
        --tokenizer_model vqkd_encoder_base_decoder_3x768x12_clip \\
        --tokenizer_weight https://github.com/addf400/files/releases/download/BEiT-v2/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \\
        --batch_size 128 \\
        --lr 1.5e-3 \\
        --warmup_epochs 10 \\
        --clip_grad 3.0 \\
        --drop_path 0.1 \\
        --layer_scale_init_value 0.1 \\
        --imagenet_default_mean_and_std \\
        --opt_betas 0.9 0.999 \\
        --opt_eps 1e-8  \\
        --epochs 1600 \\
        --save_ckpt_freq 20
"""


@pytest.fixture(scope="module")
def vqkd_file(tmp_path_factory):
    """A random-weight tiny VQ-KD (64 codes x 32) saved as unilm's files are: {'model': state dict}."""
    from mcbeit.tokenizers.vqkd import VQKD

    torch.manual_seed(0)
    model = VQKD(VQKD_MODEL, image_size=64, codebook_size=CODES, codebook_dim=32)
    path = tmp_path_factory.mktemp("vqkd") / "vqkd_encoder_tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _args(data, out, vqkd_file, *extra):
    argv = ["--data_path", str(data), "--output_dir", str(out), "--tokenizer_weight", str(vqkd_file), *V2_FAST,
            *extra]
    return pretrain.get_beitv2_args_parser().parse_args(argv)


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_one_process_trains_and_resumes_bit_for_bit(embedded_subset, vqkd_file, tmp_path):
    """60 images / batch 8 = 7 steps an epoch, drop path on: a run resumed from its mid-epoch checkpoint
    (step 5) ends where the uninterrupted one does, weights and optimizer state bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ["--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--lr", "2e-3", "--save_ckpt_steps", "5"]
    resumed.mkdir()
    watcher = _keep_when_written(whole / "checkpoint-0-step5.pth", resumed / "checkpoint-0-step5.pth")
    pretrain.run(_args(embedded_subset, whole, vqkd_file, *extra))
    watcher.join()
    log = _log(whole)
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_steps"] == 7 for r in log)
    for r in log:
        assert r["train_loss"] == pytest.approx(r["train_loss_1"] + r["train_loss_2"], rel=1e-5)
        assert 0 <= r["train_mlm_acc_1"] <= 1 and 0 <= r["train_mlm_acc_2"] <= 1
    assert log[1]["train_loss"] < log[0]["train_loss"]  # it learns the codes
    ckpt = torch.load(whole / "checkpoint-1.pth", weights_only=True)
    assert set(ckpt["model"]) == set(UNILM_BASE_KEYS) - {"rel_pos_bias.relative_position_index"}  # unilm's names
    assert ckpt["model"]["lm_head.weight"].shape == (CODES, 192)
    assert ckpt["args"]["tokenizer_weight"] == str(vqkd_file) and ckpt["args"]["shared_lm_head"] is True

    pretrain.run(_args(embedded_subset, resumed, vqkd_file, *extra, "--resume",
                       str(resumed / "checkpoint-0-step5.pth")))
    _assert_same_state(whole / "checkpoint-1.pth", resumed / "checkpoint-1.pth")


def test_pretraining_md_command_runs_on_two_processes(embedded_subset, vqkd_file, tmp_path):
    """unilm's PRETRAINING.md command, word for word but for paths and sizes (appended last: argparse's last
    value wins), with 2 gloo processes instead of 16."""
    out = tmp_path / "out"
    command = PRETRAINING_MD_COMMAND.replace("\\\n", " ").replace("/path/to/imagenet-1k/train", str(embedded_subset))
    command = command.replace("/path/to/save/your_model", str(out))
    command = command.replace("https://github.com/addf400/files/releases/download/BEiT-v2/"
                              "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth", str(vqkd_file))
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "torch.distributed.launch", "--nproc_per_node=16"]
    argv[0], argv[3] = PYTHON, "--nproc_per_node=2"
    argv[4:4] = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    sizes = ["--model", "beit_tiny_patch16_224_8k_vocab_cls_pt", "--input_size", "112", "--second_input_size", "112",
             "--num_mask_patches", "19", "--tokenizer_model", VQKD_MODEL, "--codebook_size", str(CODES),
             "--batch_size", "6", "--epochs", "1", "--num_workers", "1", "--device", "cpu", "--eval_freq", "0"]
    run_cli(argv + sizes, tmp_path)
    (rec,) = _log(out)
    assert rec["train_steps"] == 5  # 60 images / (6 per process x 2 processes)
    assert rec["train_loss"] == pytest.approx(rec["train_loss_1"] + rec["train_loss_2"], rel=1e-5)
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    a = ckpt["args"]
    assert a["discrete_vae_type"] == "vqkd" and a["tokenizer_model"] == VQKD_MODEL
    assert a["world_size"] == 2 and a["shared_lm_head"] is True and (a["early_layers"], a["head_layers"]) == (9, 2)
    assert (a["min_crop_scale"], a["second_interpolation"], a["clip_grad"], a["lr"]) == (0.2, "bicubic", 3.0, 1.5e-3)
    assert a["opt_betas"] == [0.9, 0.999] and a["imagenet_default_mean_and_std"] and a["warmup_epochs"] == 10
    assert (a["drop_path"], a["layer_scale_init_value"], a["log_dir"]) == (0.1, 0.1, str(out))
    assert set(ckpt["model"]) == set(UNILM_BASE_KEYS) - {"rel_pos_bias.relative_position_index"}


def _ready(**flags):
    values = {"model": "beit_tiny_patch16_224_8k_vocab_cls_pt", "input_size": 64, "second_input_size": 64,
              "num_mask_patches": 6, "min_mask_patches_per_block": 2, "codebook_size": CODES, "output_dir": "",
              "device": "cpu", **flags}
    config = resolve(BeitV2PretrainConfig, values)
    return Trainer(config, PretrainTask(config)).ready(steps_per_epoch=4)


def test_a_unilm_layout_checkpoint_loads_strictly(tmp_path):
    """unilm's utils.save_model file: {'model' (with rel_pos_bias.relative_position_index), 'optimizer', 'epoch',
    'args': argparse.Namespace}; through the task's load_weights into the v2 model, strictly."""
    torch.manual_seed(1)
    source = _ready(seed=1).task.model
    sd = dict(source.state_dict())
    sd["rel_pos_bias.relative_position_index"] = source.rel_pos_bias.relative_position_index.clone()
    path = tmp_path / "checkpoint-0.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "scaler": {},
                "args": argparse.Namespace(model="beit_tiny_patch16_224_8k_vocab_cls_pt", early_layers=9)}, path)
    run = _ready()
    task = run.task
    assert not torch.equal(task.model.cls_pt_layers[0].attn.qkv.weight, sd["cls_pt_layers.0.attn.qkv.weight"])
    ckpt = ckpt_io.load_training_checkpoint(path)
    assert task.load_weights(ckpt, str(path)) is False  # weights only: not our format
    for key, value in task.model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # mmpretrain's file of the same weights ({'meta', 'state_dict'} in its names, with its tokenizer): --resume
    # takes it through the name map, weights only, the tokenizer listed as not loaded
    from tests.models.test_released_v2 import write_mmpretrain_v2_pretraining

    mm = tmp_path / "epoch_300.pth"
    write_mmpretrain_v2_pretraining(mm, sd)
    fresh = _ready().task
    assert fresh.load_weights(ckpt_io.load_training_checkpoint(mm), str(mm)) is False
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # strict: a file without the aggregation head does not load into the v2 model
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("cls_pt_layers.")}, "epoch": 0}, path)
    with pytest.raises(StateDictMismatchError, match="cls_pt_layers"):
        task.load_weights(ckpt_io.load_training_checkpoint(path), str(path))


def test_mcbeit_soft_targets_over_a_vqkd_codebook(embedded_subset, vqkd_file, tmp_path):
    """mcbeit-pretrain --tokenizer_type vqkd (= --discrete_vae_type vqkd) with a VQ-KD file: mc-BEiT's loss over
    its codebook."""
    out = tmp_path / "soft"
    argv = ["--data_path", str(embedded_subset), "--output_dir", str(out), "--tokenizer_type", "vqkd",
            "--discrete_vae_weight_path", str(vqkd_file), "--model", "beit_tiny_patch16_224_8k_vocab",
            "--input_size", "64", "--second_input_size", "64", "--num_mask_patches", "6",
            "--min_mask_patches_per_block", "2", "--batch_size", "12", "--epochs", "1", "--num_workers", "0",
            "--eval_freq", "0", "--device", "cpu"]
    pretrain.run(pretrain.get_args_parser().parse_args(argv))
    (rec,) = _log(out)
    assert rec["train_steps"] == 5 and 0 < rec["train_loss"] < 10 and rec["temp"] == 4.0
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["discrete_vae_type"] == "vqkd" and ckpt["model"]["lm_head.weight"].shape == (CODES, 192)


def test_defaults_are_the_originals_and_the_embedded_run():
    parse = pretrain.get_beitv2_args_parser().parse_args
    real = pretrain.resolve_defaults(parse(["--data_path", "D", "--tokenizer_weight", "W"]))
    assert isinstance(real, BeitV2PretrainConfig)
    # the tokenizer's architecture and codebook: the file's (unilm's defaults are what its released files hold;
    # where a file differs the original fails its strict load, here the file decides)
    assert (real.model, real.tokenizer_model, real.codebook_size, real.codebook_dim) == (
        "beit_base_patch16_224_8k_vocab", None, None, None)
    assert (real.early_layers, real.head_layers, real.shared_lm_head, real.decoupling_aug) == (9, 2, True, False)
    assert (real.input_size, real.second_input_size, real.num_mask_patches, real.min_mask_patches_per_block) == (
        224, 224, 75, 16)
    assert (real.lr, real.warmup_epochs, real.min_lr, real.opt_betas, real.opt_eps, real.clip_grad) == (
        5e-4, 5, 1e-5, None, 1e-8, None)
    assert (real.drop_path, real.layer_scale_init_value, real.weight_decay, real.color_jitter) == (0.1, 0.1, 0.05, 0.4)
    assert (real.min_crop_scale, real.train_interpolation, real.second_interpolation) == (0.08, "bicubic", "lanczos")
    assert not real.imagenet_default_mean_and_std and real.rel_pos_bias and not real.abs_pos_emb
    assert (real.epochs, real.batch_size, real.save_ckpt_freq) == (300, 64, 20)
    assert real.output_dir == "./output/beitv2_pretrained"
    # no --tokenizer_weight: a RANDOM tokenizer, the tiny one unless --tokenizer_model says otherwise
    assert pretrain.resolve_defaults(parse(["--data_path", "D"])).tokenizer_model == "vqkd_encoder_tiny_decoder_1x192x3"
    emb = pretrain.resolve_defaults(parse([]))
    assert (emb.model, emb.input_size, emb.second_input_size) == ("beit_tiny_patch16_224_8k_vocab_cls_pt", 112, 112)
    assert emb.tokenizer_weight is None and emb.tokenizer_model == "vqkd_encoder_tiny_decoder_1x192x3"
    # unilm's bool_flag spellings
    assert not pretrain.resolve_defaults(parse(["--shared_lm_head", "False"])).shared_lm_head
    assert pretrain.resolve_defaults(parse(["--shared_lm_head", "True", "--decoupling_aug", "False"])).shared_lm_head
    help_text = pretrain.get_beitv2_args_parser().format_help()
    assert "--opt_betas None (mc-BEiT: 0.9 0.98)" in help_text and "--decoupling_aug True is refused" in help_text


def _fails(argv, match, tmp_path, parser=pretrain.get_beitv2_args_parser):
    with pytest.raises(SystemExit) as info:
        pretrain.run(parser().parse_args(["--output_dir", str(tmp_path / "bad"), *argv]))
    assert isinstance(info.value.code, str), info.value.code
    assert re.search(match, info.value.code), info.value.code


def test_bad_flags_give_clear_errors(embedded_subset, vqkd_file, tmp_path, capsys):
    data = ["--data_path", str(embedded_subset)]
    with pytest.raises(SystemExit) as info:
        pretrain.get_beitv2_args_parser().parse_args(["--shared_lm_head", "maybe"])
    assert info.value.code == 2 and "invalid boolean value: 'maybe'" in capsys.readouterr().err
    _fails(["--decoupling_aug", "True"], "decoupling_aug True is not implemented", tmp_path)
    _fails(["--tokenizer_weight", str(vqkd_file), "--discrete_vae_weight_path", "X"],
           "--discrete_vae_weight_path and --tokenizer_weight: BEiT v2 reads its VQ-KD tokenizer from --tokenizer_weight",
           tmp_path)
    _fails(["--tokenizer_weight", str(tmp_path / "none.pth"), *data], "none.pth does not exist: pass a VQ-KD file",
           tmp_path)
    _fails([*data, "--tokenizer_weight", str(vqkd_file), *V2_FAST, "--codebook_size", "128"],
           r"64 codes of dimension 32, but 128 x 32 were asked for \(--codebook_size", tmp_path)
    _fails([*data, "--tokenizer_weight", str(vqkd_file), *V2_FAST, "--tokenizer_model",
            "vqkd_encoder_base_decoder_3x768x12_clip"], "--tokenizer_model vqkd_encoder_base_decoder_3x768x12_clip "
           "names a 12-block 768-d one", tmp_path)
    _fails([*data, *V2_FAST, "--early_layers", "13"], r"--early_layers 13 --model beit_tiny_patch16_224_8k_vocab_cls_pt",
           tmp_path)
    _fails([*data, "--model", "beit_tiny_patch16_224_8k_vocab_cls_pt"], "BEiT v2's patch-aggregation model .* "
           "mcbeit-pretrain-beitv2", tmp_path, parser=pretrain.get_args_parser)
