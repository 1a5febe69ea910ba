"""`mcbeit-finetune` / `run_class_finetuning.py`: the original flags, the seeds' command lines, resume,
best checkpoint, --eval, exact distributed evaluation, EMA, accumulation, mixup, DeepSpeed, class names."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import timm
import torch

import mcbeit.models.classifier  # noqa: F401  (registers the tiny and small sizes)
from mcbeit.engine.distributed import cleanup
from mcbeit.cli import export, finetune
from mcbeit.models.checkpoint import load_checkpoint_file, resolve_source
from tests.tasks.conftest import PYTHON, make_image_folder, run_cli, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

# The seeds' fine-tuning commands, word for word: mc-BEiT's README (seed 000) and BEiT's (seed 002).
SEED_000 = """
python -m torch.distributed.launch --nproc_per_node=8 run_class_finetuning.py \\
    --model beit_base_patch16_224 --data_path ${DATA_PATH}\\
    --finetune ${CKP} \\
    --output_dir ${OUTPUT_DIR} --batch_size 128 --lr 4e-3 --update_freq 1 \\
    --warmup_epochs 20 --epochs 100 --layer_decay 0.65 --drop_path 0.1 \\
    --weight_decay 0.05 --mixup 0.8 --cutmix 1.0 --nb_classes 1000 --enable_deepspeed \\
    --imagenet_default_mean_and_std
"""
SEED_002 = """
OMP_NUM_THREADS=1 python -m torch.distributed.launch --nproc_per_node=16 run_class_finetuning.py \\
    --model beit_large_patch16_224 --data_path $DATA_PATH \\
    --nb_classes 21841 --data_set image_folder --disable_eval_during_finetuning \\
    --finetune https://unilm.blob.core.windows.net/beit/beit_large_patch16_224_pt22k.pth \\
    --output_dir $OUTPUT_DIR --batch_size 64 --lr 2e-3 --update_freq 2 \\
    --warmup_epochs 5 --epochs 90 --layer_decay 0.75 --drop_path 0.2 \\
    --weight_decay 0.05 --enable_deepspeed --layer_scale_init_value 1e-5 --clip_grad 1.0
"""
# Appended last (argparse's last value wins): what a 2-core CI machine can afford.
CI_SIZED = ["--model", "beit_tiny_patch16_224", "--input_size", "64", "--batch_size", "4", "--epochs", "2",
            "--num_workers", "0", "--device", "cpu", "--print_freq", "1"]
FAST = ["--model", "beit_tiny_patch16_224", "--input_size", "64", "--batch_size", "8", "--num_workers", "0",
        "--device", "cpu", "--print_freq", "2", "--aa", "", "--reprob", "0", "--warmup_epochs", "0"]



def _pretrained_checkpoint(path, input_size=64):
    """A real mcbeit-pretrain checkpoint of the tiny MIM model (shared relative bias, lm_head, mask_token)."""
    torch.manual_seed(0)
    model = timm.create_model("beit_tiny_patch16_224_8k_vocab", img_size=input_size, vocab_size=64,
                              use_shared_rel_pos_bias=True, init_values=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "mcbeit-pretrain-v1", "model": model.state_dict(), "epoch": 799,
                "args": {"model": "beit_tiny_patch16_224_8k_vocab"}}, path)
    return model


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """IMNET layout: <root>/train/<class>/ and <root>/val/<class>/, 4 classes; 15 val images (odd on purpose)."""
    root = tmp_path_factory.mktemp("cls")
    make_image_folder(root / "train", n_per_class=8, size=64, seed=1)
    make_image_folder(root / "val", n_per_class=4, size=64, seed=2)
    next((root / "val" / "class_3").glob("*.jpg")).unlink()
    return root


def _seed_argv(text, replacements, nproc):
    command = text.replace("\\\n", " ")
    for key, value in replacements.items():
        command = command.replace(key, value)
    argv = shlex.split(command)
    env = [a for a in argv if re.match(r"^[A-Z_]+=", a)]
    argv = argv[len(env):]
    assert argv[:3] == ["python", "-m", "torch.distributed.launch"] and argv[4] == "run_class_finetuning.py"
    argv[0], argv[3] = PYTHON, f"--nproc_per_node={nproc}"
    argv[4:4] = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return argv


def test_every_original_flag_parses():
    argv = shlex.split(
        "--batch_size 4 --epochs 2 --update_freq 2 --save_ckpt_freq 1 --model beit_tiny_patch16_224 --rel_pos_bias "
        "--disable_rel_pos_bias --abs_pos_emb --layer_scale_init_value 0.1 --input_size 64 --drop 0.1 "
        "--attn_drop_rate 0.1 --drop_path 0.2 --disable_eval_during_finetuning --model_ema --model_ema_decay 0.99 "
        "--model_ema_force_cpu --opt adamw --opt_eps 1e-6 --opt_betas 0.9 0.999 --clip_grad 1.0 --momentum 0.8 "
        "--weight_decay 0.05 --weight_decay_end 0.1 --lr 1e-3 --layer_decay 0.65 --warmup_lr 1e-6 --min_lr 1e-6 "
        "--warmup_epochs 1 --warmup_steps 3 --color_jitter 0.3 --aa rand-m9-mstd0.5-inc1 --smoothing 0.1 "
        "--train_interpolation bicubic --crop_pct 0.9 --reprob 0.25 --remode pixel --recount 1 --resplit "
        "--mixup 0.8 --cutmix 1.0 --cutmix_minmax 0.2 0.8 --mixup_prob 1.0 --mixup_switch_prob 0.5 "
        "--mixup_mode batch --finetune x.pth --model_key model|module --model_prefix enc. --init_scale 0.001 "
        "--use_mean_pooling --use_cls --disable_weight_decay_on_rel_pos_bias --data_path d --eval_data_path e "
        "--nb_classes 10 --imagenet_default_mean_and_std --data_set image_folder --output_dir o --log_dir l "
        "--device cpu --seed 1 --resume r --auto_resume --no_auto_resume --save_ckpt --no_save_ckpt "
        "--start_epoch 1 --eval --dist_eval --num_workers 2 --pin_mem --no_pin_mem --world_size 2 --local_rank 0 "
        "--dist_on_itp --dist_url env:// --enable_deepspeed")
    args = finetune.get_args_parser().parse_args(argv)
    assert (args.rel_pos_bias, args.use_mean_pooling, args.auto_resume, args.save_ckpt, args.pin_mem) == (False,) * 5
    assert args.opt_betas == [0.9, 0.999] and args.cutmix_minmax == [0.2, 0.8] and args.enable_deepspeed
    assert finetune.get_args_parser().parse_args(["--local-rank", "3"]).local_rank == 3


def test_finetune_resume_best_and_eval(data, tmp_path):
    """From a pre-training checkpoint: weights loaded, 2 epochs, best kept; resumed to 3; --eval of the best."""
    pre = _pretrained_checkpoint(tmp_path / "pre" / "checkpoint-799.pth")
    out = tmp_path / "out"
    common = ["--data_path", str(data), "--output_dir", str(out), *FAST, "--lr", "2e-3", "--layer_decay", "0.75"]
    experiment = [*common, "--finetune", str(tmp_path / "pre" / "checkpoint-799.pth"), "--save_ckpt_freq", "1",
                  "--model_ema", "--model_ema_decay", "0.5"]
    assert finetune.main([*experiment, "--epochs", "2"]) == 0
    first = _log(out)
    assert [r["epoch"] for r in first] == [0, 1] and all(r["train_steps"] == 4 and r["test_images"] == 15 for r in first)
    assert all(0 <= r["test_acc1"] <= r["test_acc5"] <= 100 for r in first) and "test_ema_acc1" in first[0]
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert ckpt["format"] == "mcbeit-finetune-v1" and ckpt["model_ema"] is not None
    assert ckpt["model"]["head.weight"].shape == (4, 192) and "fc_norm.weight" in ckpt["model"]
    moved = (ckpt["model"]["blocks.0.mlp.fc1.weight"] - pre.state_dict()["blocks.0.mlp.fc1.weight"]).abs()
    assert 0 < moved.max() < 0.05                                        # started from the pre-trained weights
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == "best" and best["max_accuracy"] == max(r["test_acc1"] for r in first)
    assert ckpt["classes"] == best["classes"] == ["class_0", "class_1", "class_2", "class_3"]   # the folders' names
    timm.create_model("beit_tiny_patch16_224", num_classes=4, img_size=64).load_state_dict(ckpt["model"], strict=True)

    # auto-resume: epoch 2 only (the same experiment's flags; its longer schedule accepted explicitly)
    assert finetune.main([*experiment, "--epochs", "3", "--accept_changed_flags", "epochs"]) == 0
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[:2] == first

    best = torch.load(out / "checkpoint-best.pth", weights_only=True)     # rewritten when epoch 2 improved
    assert best["max_accuracy"] == max(r["test_acc1"] for r in log)
    stats = finetune.run(finetune.get_args_parser().parse_args(
        [*common, "--eval", "--resume", str(out / "checkpoint-best.pth")]))
    assert stats["test_acc1"] == pytest.approx(best["max_accuracy"]) and stats["test_images"] == 15
    cleanup()


def test_accumulation_mixup_and_cls_pooling_run(data, tmp_path):
    out = tmp_path / "acc"
    assert finetune.main(["--data_path", str(data), "--output_dir", str(out), *FAST, "--epochs", "1",
                          "--update_freq", "2", "--mixup", "0.8", "--cutmix", "1.0", "--use_cls", "--clip_grad", "1.0",
                          "--disable_weight_decay_on_rel_pos_bias"]) == 0
    (row,) = _log(out)
    assert row["train_steps"] == 2 and "train_class_acc" not in row   # 32 images / (8 x 2) ; no accuracy under mixup
    assert row["train_grad_norm"] > 0
    sd = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    assert "norm.weight" in sd and "fc_norm.weight" not in sd


def test_distributed_eval_counts_every_image_once(data, tmp_path):
    """15 images over 2 ranks: --dist_eval gives exactly the 1-process figures (no padded duplicates)."""
    out = tmp_path / "ev"
    assert finetune.main(["--data_path", str(data), "--output_dir", str(out), *FAST, "--epochs", "1"]) == 0
    single = finetune.run(finetune.get_args_parser().parse_args(
        ["--data_path", str(data), "--output_dir", str(out), *FAST, "--eval"]))
    cleanup()
    proc = run_cli([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}", "run_class_finetuning.py", "--data_path", str(data),
                    "--output_dir", str(out), *FAST, "--eval", "--dist_eval"], tmp_path)
    line = re.search(r"on the (\d+) test images: acc1 ([\d.]+)%, acc5 ([\d.]+)%", proc.stderr + proc.stdout)
    assert line and int(line[1]) == 15
    assert float(line[2]) == pytest.approx(single["test_acc1"], abs=0.01)
    assert float(line[3]) == pytest.approx(single["test_acc5"], abs=0.01)


def test_seed_000_command_runs_with_small_data(data, tmp_path):
    """mc-BEiT's fine-tuning command (DeepSpeed, mixup, cutmix), 2 processes, from a pre-training checkpoint."""
    ckp = tmp_path / "output" / "mcbeit_pretrained" / "checkpoint-799.pth"
    _pretrained_checkpoint(ckp)
    argv = _seed_argv(SEED_000, {"${DATA_PATH}": str(data), "${CKP}": str(ckp), "${OUTPUT_DIR}": str(tmp_path / "ft")}, 2)
    run_cli(argv + CI_SIZED, tmp_path, timeout=600)
    out = tmp_path / "ft"
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_steps"] == 4 for r in log)  # 32 / (4 x 2 ranks)
    assert (out / "checkpoint-1" / "mcbeit_checkpoint.json").is_file() and (out / "latest").is_file()
    assert all(r["test_images"] == 15 for r in log)


def test_seed_002_command_runs_with_small_data(data, tmp_path):
    """BEiT's ImageNet-22k command: --finetune is an https URL, served from the torch hub cache (no download)."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    _pretrained_checkpoint(hub / "beit_large_patch16_224_pt22k.pth")
    argv = _seed_argv(SEED_002, {"$DATA_PATH": str(data / "train"), "$OUTPUT_DIR": str(tmp_path / "ft22k")}, 2)
    env_torch_home = {"TORCH_HOME": str(tmp_path / "torch_home")}
    import os

    old = {k: os.environ.get(k) for k in env_torch_home}
    os.environ.update(env_torch_home)
    try:
        run_cli(argv + CI_SIZED, tmp_path, timeout=600)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    log = _log(tmp_path / "ft22k")
    assert [r["epoch"] for r in log] == [0, 1] and "test_acc1" not in log[0]   # --disable_eval_during_finetuning
    assert all(r["train_steps"] == 2 for r in log)                            # 32 / (4 x update_freq 2 x 2 ranks)


def test_finetune_at_a_larger_size_interpolates_the_pretrained_tables(data, tmp_path):
    """A 64 px pre-training checkpoint (4x4 patches) fine-tuned at 96 px (6x6): every block's table is the
    shared table interpolated by the original's rule (lr ~ 0, so one epoch leaves it as loaded)."""
    from mcbeit.models.position_resize import interpolate_rel_pos_table

    pre = _pretrained_checkpoint(tmp_path / "pre.pth", input_size=64)
    out = tmp_path / "big"
    assert finetune.main(["--data_path", str(data), "--output_dir", str(out), *FAST, "--input_size", "96",
                          "--finetune", str(tmp_path / "pre.pth"), "--epochs", "1", "--lr", "1e-12", "--min_lr", "0",
                          "--disable_eval_during_finetuning"]) == 0
    sd = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    shared = pre.state_dict()["rel_pos_bias.relative_position_bias_table"]                 # (7*7+3, heads)
    expected = interpolate_rel_pos_table(shared, (2 * 6 - 1) ** 2 + 3, (6, 6))
    assert expected.shape == (124, 3)
    for i in range(12):
        torch.testing.assert_close(sd[f"blocks.{i}.attn.relative_position_bias_table"], expected, atol=1e-6, rtol=0)


def test_linear_probe_trains_only_the_head(data, tmp_path):
    pre = _pretrained_checkpoint(tmp_path / "pre.pth")
    out = tmp_path / "lp"
    assert finetune.main_linprobe(["--data_path", str(data), "--output_dir", str(out), *FAST, "--epochs", "3",
                                   "--finetune", str(tmp_path / "pre.pth"), "--probe_layer", "9"]) == 0
    log = _log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    ckpt = torch.load(out / "checkpoint-2.pth", weights_only=True)
    assert ckpt["args"]["linear_probe"] and ckpt["args"]["opt"] == "lars" and ckpt["args"]["lr"] == 0.1 * 8 / 256
    sd = ckpt["model"]
    assert set(k for k in sd if not k.startswith("backbone.")) == {
        "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "head.weight", "head.bias"}  # no BN affine
    for name, value in pre.state_dict().items():                                             # the backbone is frozen
        if f"backbone.{name}" in sd:
            assert torch.equal(sd[f"backbone.{name}"], value), name
    assert sd["bn.num_batches_tracked"] == 12 and sd["head.weight"].shape == (4, 192)
    assert ckpt["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    stats = finetune.run(finetune.get_linprobe_parser().parse_args(
        ["--data_path", str(data), "--output_dir", str(out), *FAST, "--eval", "--probe_layer", "9"]))
    cleanup()
    assert stats["test_acc1"] == pytest.approx(log[-1]["test_acc1"])


def test_eval_reads_deepspeed_folders_and_refuses_to_evaluate_nothing(data, tmp_path):
    out = tmp_path / "ds"
    common = ["--data_path", str(data), "--output_dir", str(out), *FAST]
    assert finetune.main([*common, "--epochs", "1", "--enable_deepspeed"]) == 0
    (row,) = _log(out)
    assert (out / "checkpoint-0").is_dir() and (out / "checkpoint-best").is_dir()
    for folder in ("checkpoint-0", "checkpoint-best"):                   # the class names are in the client state
        states = load_checkpoint_file(resolve_source(str(out / folder)))
        assert states["classes"] == ["class_0", "class_1", "class_2", "class_3"], folder
    for extra in (["--enable_deepspeed"], ["--resume", str(out / "checkpoint-best")]):
        stats = finetune.run(finetune.get_args_parser().parse_args([*common, "--eval", *extra]))
        cleanup()
        assert stats["test_acc1"] == pytest.approx(row["test_acc1"]) and stats["test_loss"] == pytest.approx(row["test_loss"])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        finetune.run(finetune.get_args_parser().parse_args(
            ["--data_path", str(data), "--output_dir", str(tmp_path / "empty"), *FAST, "--eval"]))
    cleanup()


def test_embedded_run_picks_the_newest_pretrained_checkpoint_unless_told_none(tmp_path, monkeypatch):
    """No --data_path and no --finetune: the newest ./output/mcbeit_pretrained checkpoint; --finetune none: random init."""
    monkeypatch.chdir(tmp_path)
    parse = lambda *argv: finetune.resolve_defaults(finetune.get_args_parser().parse_args(list(argv)))  # noqa: E731
    assert parse().finetune == ""                                    # nothing pre-trained yet: random init
    out = tmp_path / "output" / "mcbeit_pretrained"
    out.mkdir(parents=True)
    for epoch in (1, 3, 10):
        (out / f"checkpoint-{epoch}.pth").write_bytes(b"")
    assert parse().finetune == str(Path(finetune.PRETRAINED_OUTPUT_DIR) / "checkpoint-10.pth")
    assert parse("--finetune", "none").finetune == "" and parse("--finetune", "Random").finetune == ""
    assert parse("--finetune", "w.pth").finetune == "w.pth"
    assert parse("--data_path", str(tmp_path)).finetune == ""      # real data: never a checkpoint we were not given


# ---------------------------------------------------------------------- class names in the checkpoints
NAMES = ["tabby cat", "goldfish", "Zebra", "space shuttle"]   # label order = sorted folder names: Zebra first


def _named_folders(root, names, n_per_class, seed):
    """make_image_folder's 4 classes, their folders renamed to ``names``."""
    make_image_folder(root, n_per_class=n_per_class, size=64, seed=seed)
    for i, name in enumerate(names):
        (root / f"class_{i}").rename(root / name)
    return root


def test_checkpoints_keep_the_class_folder_names(tmp_path, capsys):
    data = tmp_path / "data"
    _named_folders(data / "train", NAMES, 4, seed=3)
    _named_folders(data / "val", NAMES, 2, seed=4)
    out = tmp_path / "out"
    assert finetune.main(["--data_path", str(data), "--output_dir", str(out), *FAST, "--epochs", "1"]) == 0
    for name in ("checkpoint-0.pth", "checkpoint-best.pth"):
        assert torch.load(out / name, weights_only=True)["classes"] == sorted(NAMES), name
    assert export.main([str(out / "checkpoint-best.pth"), "--output", str(tmp_path / "export")]) == 0  # and on to timm
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert list(reloaded.pretrained_cfg["label_names"]) == sorted(NAMES)

    # val folders named differently: the train set's names are kept, with a warning
    other = _named_folders(tmp_path / "other_val", ["a", "b", "c", "d"], 2, seed=5)
    capsys.readouterr()
    assert finetune.main(["--data_set", "image_folder", "--data_path", str(data / "train"), "--eval_data_path",
                          str(other), "--output_dir", str(tmp_path / "mixed"), *FAST, "--epochs", "1"]) == 0
    assert "the train and val data name their classes differently" in capsys.readouterr().err
    assert torch.load(tmp_path / "mixed" / "checkpoint-best.pth", weights_only=True)["classes"] == sorted(NAMES)


def _list_layout(root):
    """train/ + val/ images listed in train_map.txt / val_map.txt (labels only)."""
    for split, n in (("train", 4), ("val", 2)):
        make_image_folder(root / split, n_per_class=n, size=64, seed=6)
        lines = [f"{p.relative_to(root / split).as_posix()} {p.parent.name[-1]}" for p in sorted((root / split).rglob("*.jpg"))]
        (root / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    return root


def test_list_layout_names_come_from_classes_txt_and_old_checkpoints_still_resume(tmp_path):
    data = _list_layout(tmp_path / "data")
    common = ["--data_path", str(data), *FAST]
    assert finetune.main([*common, "--output_dir", str(tmp_path / "bare"), "--epochs", "1"]) == 0
    assert torch.load(tmp_path / "bare" / "checkpoint-0.pth", weights_only=True)["classes"] == []  # no classes.txt

    (data / "classes.txt").write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "named"
    assert finetune.main([*common, "--output_dir", str(out), "--epochs", "1"]) == 0
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["classes"] == NAMES and ckpt["args"]["nb_classes"] == 4          # line i names label i
    assert torch.load(out / "checkpoint-best.pth", weights_only=True)["classes"] == NAMES

    # a checkpoint written before class names were kept (no 'classes') resumes, and the next one has them
    del ckpt["classes"]
    torch.save(ckpt, out / "checkpoint-0.pth")
    assert finetune.main([*common, "--output_dir", str(out), "--epochs", "2", "--accept_changed_flags", "epochs"]) == 0
    assert [r["epoch"] for r in _log(out)] == [0, 1]
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["classes"] == NAMES


def test_a_classes_txt_short_of_the_labels_stops_the_run(tmp_path):
    data = _list_layout(tmp_path / "data")
    (data / "classes.txt").write_text("tabby cat\ngoldfish\n")
    with pytest.raises(SystemExit, match=r"classes.txt names 2 classes, but .*train_map.txt has labels up to 3 "
                                         r"\(4 classes\): add the missing names"):
        finetune.run(finetune.get_args_parser().parse_args(
            ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), *FAST, "--epochs", "1"]))
    cleanup()
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()
