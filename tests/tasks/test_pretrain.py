import json
import shlex

import re

import pytest
import torch

from mcbeit.cli import pretrain
from tests.tasks.conftest import FAST, SEED_README_COMMAND



def parse(argv):
    return pretrain.resolve_defaults(pretrain.get_args_parser().parse_args(argv))


def test_seed_readme_flags_parse_to_their_meaning():
    argv = shlex.split(SEED_README_COMMAND.replace("\\\n", " "))
    flags = argv[argv.index("run_mcbeit_pretraining.py") + 1:]
    args = parse([{"${DATA_PATH}": "DATA", "${OUTPUT_DIR}": "OUT", "${TOKENIZER_PATH}": "TOK"}.get(a, a) for a in flags])
    assert (args.data_path, args.output_dir, args.discrete_vae_weight_path) == ("DATA", "OUT", "TOK")
    assert args.discrete_vae_type == "vqgan"  # the original's default tokenizer
    assert (args.batch_size, args.lr, args.warmup_epochs, args.epochs) == (128, 1.5e-3, 10, 800)
    assert (args.clip_grad, args.drop_path, args.layer_scale_init_value) == (3.0, 0.1, 0.1)
    assert args.mask_type == "random" and args.mask_ratio == 0.75
    assert args.imagenet_default_mean_and_std and args.omega == 0.2 and args.temp == args.temp_warmup == 4.0
    assert args.auto_resume and args.rel_pos_bias and not args.abs_pos_emb
    assert args.save_ckpt_freq == 20 and args.weight_decay == args.weight_decay_end == 0.05
    assert args.opt == "adamw" and list(args.opt_betas) == [0.9, 0.98] and args.opt_eps == 1e-8


def test_every_original_flag_is_accepted():
    argv = ("--batch_size 2 --epochs 3 --save_ckpt_freq 1 --discrete_vae_weight_path W --discrete_vae_type dall-e "
            "--model beit_small_patch16_224_8k_vocab --rel_pos_bias --disable_rel_pos_bias --abs_pos_emb "
            "--layer_scale_init_value 0 --num_mask_patches 50 --max_mask_patches_per_block 30 "
            "--min_mask_patches_per_block 8 --mask_ratio 0.4 --mask_type block --input_size 192 "
            "--second_input_size 96 --drop_path 0.2 --opt sgd --opt_eps 1e-6 --opt_betas 0.8 0.9 --clip_grad 1 "
            "--momentum 0.8 --weight_decay 0.1 --weight_decay_end 0.2 --lr 1e-3 --warmup_lr 1e-7 --min_lr 1e-6 "
            "--warmup_epochs 1 --warmup_steps 5 --no_loss_masked --omega 0.5 --temp 2 --temp_warmup 6 "
            "--train_interpolation bilinear --second_interpolation bicubic --data_path D "
            "--imagenet_default_mean_and_std --output_dir O --data_set image_folder --log_dir L --device cpu "
            "--seed 7 --resume R --auto_resume --no_auto_resume --debug --start_epoch 1 --num_workers 0 "
            "--pin_mem --no_pin_mem --world_size 1 --local_rank 0 --dist_on_itp --dist_url tcp://x:1")
    args = parse(argv.split())
    assert args.rel_pos_bias is False and args.auto_resume is False and args.pin_mem is False
    assert list(args.opt_betas) == [0.8, 0.9] and args.max_mask_patches_per_block == 30 and args.log_dir == "L"
    assert parse(["--local-rank", "3"]).local_rank == 3  # torch.distributed.launch's spelling


def test_defaults_are_the_embedded_run_and_the_original_otherwise():
    emb = parse([])
    assert emb.data_path is None and emb.model == "beit_tiny_patch16_224_8k_vocab"
    assert emb.discrete_vae_type == "customized"
    assert emb.epochs == pretrain.EMBEDDED_DEFAULTS["epochs"]
    assert (emb.input_size, emb.second_input_size, emb.num_mask_patches) == (112, 56, 19)
    orig = parse(["--data_path", "x"])
    assert (orig.epochs, orig.batch_size, orig.warmup_epochs, orig.save_ckpt_freq) == (300, 64, 5, 20)
    assert (orig.input_size, orig.second_input_size, orig.num_mask_patches) == (224, 112, 75)
    assert parse(["--input_size", "160", "--second_input_size", "80"]).input_size == 160  # flags win
    assert (orig.lr, orig.omega, orig.temp, orig.min_mask_patches_per_block) == (5e-4, 0.2, 4.0, 16)
    beit = pretrain.resolve_defaults(pretrain.get_beit_args_parser().parse_args(["--discrete_vae_weight_path", "w"]))
    assert beit.hard_targets and beit.discrete_vae_type == "dall-e"


def run_args(image_folder, out, *extra):
    argv = ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu", *FAST, *extra]
    return pretrain.get_args_parser().parse_args(argv)


def read_log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_pretraining_end_to_end_loss_falls(image_folder, tmp_path):
    out = tmp_path / "run"
    # 64 images / batch 8 = 8 steps per epoch, 5 epochs = 40 steps through the real pipeline.
    args = run_args(image_folder, out, "--batch_size", "8", "--epochs", "5", "--warmup_epochs", "1",
                    "--lr", "2e-3", "--save_ckpt_freq", "2")
    pretrain.run(args)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]
    assert all(r["train_steps"] == 8 for r in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.5, [r["train_loss"] for r in log]
    assert {"train_mlm_acc", "train_lr", "train_min_lr", "train_weight_decay", "train_grad_norm",
            "train_loss_scale", "train_skipped_images"} <= set(log[0])
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-3.pth",
                                                                    "checkpoint-4.pth"]
    ckpt = torch.load(out / "checkpoint-4.pth", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["global_step"] == 40 and ckpt["args"]["batch_size"] == 8
    assert "lm_head.weight" in ckpt["model"] and ckpt["optimizer"]["state"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_recompute_and_compile_train_the_same_numbers(image_folder, tmp_path):
    """--recompute none (everything kept) and --compile against the default. The compiled run uses
    the eager backend: TorchDynamo traces the model, the selective recompute and the loss as it
    would for inductor (graph breaks, guards), without minutes of C++ code generation on a CPU."""
    losses = {}
    for name, extra in (("default", ()), ("none", ("--recompute", "none")),
                        ("compiled", ("--compile", "--compile_backend", "eager"))):
        out = tmp_path / name
        pretrain.run(run_args(image_folder, out, "--batch_size", "8", "--epochs", "2", "--lr", "2e-3", *extra))
        losses[name] = [r["train_loss"] for r in read_log(out)]
        keys = torch.load(out / "checkpoint-1.pth", weights_only=True)["model"]
        assert not any("_orig_mod" in k for k in keys) and "lm_head.weight" in keys
    assert losses["none"] == pytest.approx(losses["default"], abs=1e-5)
    assert losses["compiled"] == pytest.approx(losses["default"], abs=1e-3)


def test_resume_continues_epochs_and_temperature_warmup(image_folder, tmp_path):
    out = tmp_path / "run"
    common = ["--batch_size", "16", "--temp_warmup", "1.0", "--temp", "4.0", "--save_ckpt_freq", "1",
              "--warmup_epochs", "0"]
    pretrain.run(run_args(image_folder, out, "--epochs", "2", *common))
    first = read_log(out)
    # auto-resume (the default) goes on; the longer schedule is accepted explicitly
    pretrain.run(run_args(image_folder, out, "--epochs", "4", "--accept_changed_flags", "epochs", *common))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[:2] == first
    expected = [1.0 + 3.0 * e / 29 for e in range(4)]  # the 30-epoch line, not restarted at epoch 2
    assert [r["temp"] for r in log] == pytest.approx(expected)
    ckpt = torch.load(out / "checkpoint-3.pth", weights_only=True)
    assert ckpt["global_step"] == 16


def test_auto_resume_skips_a_truncated_newest_checkpoint_and_keep_last_prunes(image_folder, tmp_path, capfd):
    """A real run whose newest checkpoint was cut short resumes from the one before it, with a warning."""
    out = tmp_path / "run"
    common = ["--batch_size", "16", "--save_ckpt_freq", "1", "--warmup_epochs", "0", "--keep_last", "2"]
    pretrain.run(run_args(image_folder, out, "--epochs", "2", *common))
    newest = out / "checkpoint-1.pth"
    newest.write_bytes(newest.read_bytes()[:4096])  # the node died while a copy of it was being made
    capfd.readouterr()
    pretrain.run(run_args(image_folder, out, "--epochs", "3", "--accept_changed_flags", "epochs", *common))
    err = capfd.readouterr().err
    assert f"skipping {newest}: truncated" in err and f"resumed from {out / 'checkpoint-0.pth'}" in err
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 1, 2]  # epoch 1 trained again from checkpoint-0
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    assert torch.load(out / "checkpoint-2.pth", weights_only=True)["global_step"] == 12


def test_divergence_skips_bad_steps_then_stops_naming_the_last_good_checkpoint(image_folder, tmp_path, capfd):
    """A real blow-up: resumed with an absurd learning rate, every step after the first is non-finite."""
    from mcbeit.engine.meter import DivergenceError
    from mcbeit.errors import EXIT_DIVERGED

    out = tmp_path / "run"
    common = ["--batch_size", "16", "--save_ckpt_freq", "1", "--warmup_epochs", "0"]
    pretrain.run(run_args(image_folder, out, "--epochs", "1", *common))
    good = (out / "checkpoint-0.pth").read_bytes()
    with pytest.raises(DivergenceError, match=rf"3 consecutive steps .*Last good checkpoint: {out / 'checkpoint-0.pth'}"):
        pretrain.run(run_args(image_folder, out, "--epochs", "3", "--lr", "1e30", "--min_lr", "1e30",
                              "--max_bad_steps", "3", "--accept_changed_flags", "epochs", "lr", "min_lr", *common))
    assert "non-finite gradient, update skipped (1 in a row; the run stops at 3)" in capfd.readouterr().err
    argv = ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu", *FAST, "--epochs", "3",
            "--lr", "1e30", "--min_lr", "1e30", "--max_bad_steps", "2", "--accept_changed_flags", "all", *common]
    assert pretrain.main(argv) == EXIT_DIVERGED                      # the command: a message, not a traceback
    assert "2 consecutive steps with a non-finite gradient" in capfd.readouterr().err
    assert (out / "checkpoint-0.pth").read_bytes() == good and not (out / "checkpoint-1.pth").exists()


def test_hard_targets_beit_loss_runs(image_folder, tmp_path):
    out = tmp_path / "run"
    pretrain.run(run_args(image_folder, out, "--batch_size", "16", "--epochs", "1", "--hard_targets",
                          "--mask_type", "random", "--mask_ratio", "0.5", "--amp", "bf16"))
    (rec,) = read_log(out)
    assert 0 < rec["train_loss"] < 20 and 0 <= rec["train_mlm_acc"] <= 1


def test_list_layout_is_detected_and_said(list_layout, tmp_path, capfd):
    out = tmp_path / "run"
    pretrain.run(run_args(list_layout, out, "--batch_size", "16", "--epochs", "1"))
    said = capfd.readouterr().err
    assert "train_map.txt" in said and "RANDOM" in said  # the layout, and the random-tokenizer warning
    assert read_log(out)[0]["train_steps"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--second_input_size", "48"], "--second_input_size 32"),
    (["--model", "beit_base_patch16_224"], "no masked-image-modeling head"),
    (["--model", "no_such_model"], "not a pre-training model"),
    (["--input_size", "60"], "not divisible"),
    (["--batch_size", "1000"], "fewer than one batch"),
    (["--amp", "fp16"], "--amp bf16"),
])
def test_bad_flags_say_what_to_do(image_folder, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message.replace("-", r"\-")):
        pretrain.run(run_args(image_folder, tmp_path / "run", "--batch_size", "8", "--epochs", "1", *extra))


def test_released_format_checkpoint_resumes_with_weights_only(image_folder, tmp_path):
    """A checkpoint shaped like the released ones (argparse.Namespace under 'args', the
    relative_position_index buffer, optimizer state of another implementation) initialises the
    run strictly; its weights are used, its epoch continues, its optimizer state is not."""
    import argparse

    import timm

    model = timm.create_model("beit_tiny_patch16_224_8k_vocab", img_size=64, vocab_size=8192,
                              use_shared_rel_pos_bias=True, init_values=0.1)
    with torch.no_grad():
        model.mask_token.fill_(0.123)
    state = dict(model.state_dict())
    state["rel_pos_bias.relative_position_index"] = model.rel_pos_bias.relative_position_index.clone()
    released = tmp_path / "released.pth"
    torch.save({"model": state, "epoch": 1, "optimizer": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="beit_tiny_patch16_224_8k_vocab", lr=1.5e-3)}, released)
    out = tmp_path / "run"
    pretrain.run(run_args(image_folder, out, "--batch_size", "16", "--epochs", "3", "--resume", str(released),
                          "--lr", "0", "--min_lr", "0", "--weight_decay", "0", "--warmup_epochs", "0"))
    assert [r["epoch"] for r in read_log(out)] == [2]
    ckpt = torch.load(out / "checkpoint-2.pth", weights_only=True)
    torch.testing.assert_close(ckpt["model"]["mask_token"], torch.full((1, 1, 192), 0.123))  # lr 0 kept it


def test_wrong_architecture_checkpoint_names_the_mismatch(image_folder, tmp_path):
    import timm

    small = timm.create_model("beit_small_patch16_224_8k_vocab", img_size=64, use_shared_rel_pos_bias=True)
    bad = tmp_path / "small.pth"
    torch.save({"model": small.state_dict(), "epoch": 0}, bad)
    with pytest.raises(SystemExit, match=r"cls_token.*384.*192|cls_token.*192.*384"):
        pretrain.run(run_args(image_folder, tmp_path / "run", "--batch_size", "16", "--epochs", "1",
                              "--resume", str(bad)))


def test_unreadable_images_are_skipped_and_counted_and_too_many_stop_the_run(tmp_path, capfd):
    from tests.tasks.conftest import make_image_folder
    from mcbeit.errors import EXIT_BAD_DATA

    data = make_image_folder(tmp_path / "data", n_per_class=4)
    (data / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "class_1" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    pretrain.run(run_args(data, out, "--batch_size", "6", "--epochs", "1", "--max_bad_fraction", "0.2"))  # 2 of 18
    (rec,) = read_log(out)
    assert rec["train_skipped_images"] == 2 and rec["train_steps"] == 3
    err = capfd.readouterr().err
    assert "broken.jpg" in err and "empty.jpg" in err                     # each named, with its reason
    argv = ["--data_path", str(data), "--output_dir", str(tmp_path / "strict"), "--device", "cpu", *FAST,
            "--batch_size", "6", "--epochs", "1"]                          # the default: at most 1 %
    assert pretrain.main(argv) == EXIT_BAD_DATA
    assert re.search(r"images in epoch 0 (so far \(step \d of 3: .*?\) )?\(", capfd.readouterr().err) and not (tmp_path / "strict" / "checkpoint-0.pth").exists()


def test_beit_entry_point_has_unilms_defaults_and_says_so():
    """run_beit_pretraining.py / mcbeit-pretrain-beit: unilm's BEiT defaults (newest commit), not mc-BEiT's."""
    beit = pretrain.to_config(pretrain.get_beit_args_parser().parse_args(["--data_path", "x"]))
    assert (beit.drop_path, list(beit.opt_betas), beit.color_jitter, beit.hard_targets) == (0.1, [0.9, 0.999], 0.4, True)
    assert beit.model == "beit_base_patch16_224_8k_vocab" and beit.discrete_vae_type == "customized"
    assert pretrain.to_config(pretrain.get_beit_args_parser().parse_args([])).model == "beit_tiny_patch16_224_8k_vocab"
    mc = parse(["--data_path", "x"])
    assert (mc.drop_path, list(mc.opt_betas), mc.color_jitter, mc.hard_targets) == (0.0, [0.9, 0.98], 0.0, False)
    described = pretrain.get_beit_args_parser().format_help()
    for said in ("--drop_path 0.1 (mc-BEiT: 0.0)", "--opt_betas 0.9 0.999 (mc-BEiT: 0.9 0.98)",
                 "--color_jitter 0.4 (mc-BEiT: 0.0)"):
        assert said in " ".join(described.split()), said
