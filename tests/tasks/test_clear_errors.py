"""Wrong input stops every long-running command before it trains, with a clean error.

Each case runs a command's real entry point in-process (argument parsing, flag resolution, run):
pre-training (`mcbeit-pretrain`), tokenizer training (`mcbeit-tokenizer train`) and fine-tuning
(`mcbeit-finetune`). It must end in ``SystemExit`` with a message (status 1 when run as a
program, like argparse's own errors but with the command's words) that names the offending flag
or value and says what to pass instead, and it must do so before the first training step: the
epoch functions are replaced by one that fails the test, and no checkpoint may be written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch

import mcbeit.models.classifier  # noqa: F401  (registers the tiny and small classifiers)
from mcbeit.engine import trainer as engine_trainer
from mcbeit.engine.distributed import DistInfo
from mcbeit.cli import pretrain
from mcbeit.cli import finetune
from mcbeit.cli import tokenizer as tok_task
from mcbeit.tokenizers.custom import CustomTokenizer
from mcbeit.objectives.vqvae import VQVAETraining
from mcbeit.tasks.finetune import CHECKPOINT_FORMAT as FINETUNE_FORMAT
from mcbeit.tasks.pretrain import CHECKPOINT_FORMAT as PRETRAIN_FORMAT
from mcbeit.tasks.tokenizer import CHECKPOINT_FORMAT as TOKENIZER_FORMAT
from tests.tasks.conftest import FAST, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("pretrain", "tokenizer", "finetune")


class TrainingStarted(Exception):
    """Raised in place of an epoch: the command got past every check."""


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise TrainingStarted("the command started training")

    for module in (engine_trainer,):
        monkeypatch.setattr(module, "train_one_epoch", refuse)


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Folders and files the cases point at (64 px images: the commands' small test geometry)."""
    root = tmp_path_factory.mktemp("clear_errors")
    few = make_image_folder(root / "few", n_per_class=1, size=64, seed=3)
    next(few.glob("class_0/*.jpg")).unlink()                                   # 3 images
    no_images = root / "no_images"
    for name in ("cats", "dogs"):
        (no_images / name).mkdir(parents=True)
    (no_images / "cats" / "notes.txt").write_text("not an image")
    bad_list = make_image_folder(root / "bad_list" / "train", n_per_class=1, size=64).parent
    (bad_list / "train_map.txt").write_text("gone/0001.jpg 0\n")              # names a missing file
    empty_list = make_image_folder(root / "empty_list" / "train", n_per_class=1, size=64).parent
    (empty_list / "train_map.txt").write_text("\n")                             # names nothing
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    paths = {"data": make_image_folder(root / "data", n_per_class=4, size=64), "few": few,
             "no_images": no_images, "bad_list": bad_list, "empty_list": empty_list, "empty": root / "empty",
             "a_file": root / "a_file",
             "missing": root / "does_not_exist", "missing_ckpt": root / "missing.pth"}
    paths.update(_checkpoints(root))
    return paths


def _checkpoints(root: Path) -> dict[str, Path]:
    """Checkpoints of another architecture than the one each command builds from the flags below."""
    torch.manual_seed(0)
    out = {}
    # pre-training: beit_small (width 384) where the run builds beit_tiny (width 192)
    small_mim = timm.create_model("beit_small_patch16_224_8k_vocab", img_size=64, use_shared_rel_pos_bias=True,
                                  init_values=0.1, vocab_size=8192)
    out["pretrain_small"] = root / "pretrain_small.pth"
    torch.save({"format": PRETRAIN_FORMAT, "model": small_mim.state_dict(), "epoch": 0,
                "args": {"model": "beit_small_patch16_224_8k_vocab", "input_size": 64}}, out["pretrain_small"])
    # tokenizer training: 64 codes where the run asks for 16
    vq = VQVAETraining(CustomTokenizer(image_size=32, head="vq", vocab_size=64, n_hid=8, n_blk_per_group=1,
                                       embed_dim=8, logit_scale=50.0), commitment=0.25, decay=0.99)
    out["tokenizer_64"] = root / "tokenizer_64.pth"
    torch.save({"format": TOKENIZER_FORMAT, "model": vq.state_dict(), "epoch": 0,
                "args": {"vocab_size": 64, "embed_dim": 8, "hidden": 8}}, out["tokenizer_64"])
    # fine-tuning: a small (wider) and a 2-block (shallower) classifier where the run builds beit_tiny
    small_cls = timm.create_model("beit_small_patch16_224", img_size=64, num_classes=4)
    out["finetune_small"] = root / "finetune_small.pth"
    torch.save({"model": small_cls.state_dict()}, out["finetune_small"])
    shallow = timm.create_model("beit_tiny_patch16_224", img_size=64, num_classes=4, depth=2)
    out["finetune_shallow"] = root / "finetune_shallow.pth"
    torch.save({"model": shallow.state_dict()}, out["finetune_shallow"])
    out["finetune_resume_small"] = root / "finetune_resume_small.pth"
    torch.save({"format": FINETUNE_FORMAT, "model": small_cls.state_dict(), "epoch": 0,
                "args": {"model": "beit_small_patch16_224", "nb_classes": 4}}, out["finetune_resume_small"])
    return out


# ----------------------------------------------------------------------------- commands
def base_argv(command: str, data: Path, out: Path) -> list[str]:
    """A command line that passes every check (see test_the_base_command_lines_reach_training); a case
    appends its flags, which win (argparse keeps the last value)."""
    if command == "pretrain":
        return ["--data_path", str(data), "--output_dir", str(out), "--device", "cpu", *FAST,
                "--batch_size", "8", "--epochs", "1"]
    if command == "tokenizer":
        return ["train", "--data_path", str(data), "--output_dir", str(out), "--device", "cpu", "--input_size", "32",
                "--vocab_size", "16", "--embed_dim", "8", "--hidden", "8", "--batch_size", "8", "--epochs", "1",
                "--num_workers", "0"]
    return ["--data_path", str(data), "--eval_data_path", str(data), "--output_dir", str(out), "--device", "cpu",
            "--model", "beit_tiny_patch16_224", "--input_size", "64", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "0", "--aa", "", "--reprob", "0", "--warmup_epochs", "0"]


MAINS = {"pretrain": pretrain.main, "tokenizer": tok_task.main, "finetune": finetune.main}


def refused(command: str, argv: list[str], out: Path) -> str:
    """Run the command; it must stop with SystemExit(message) before training (and write no checkpoint).
    Returns the message."""
    before = sorted(out.glob("checkpoint-*"))
    with pytest.raises(SystemExit) as stopped:
        MAINS[command](argv)
    message = stopped.value.code
    assert isinstance(message, str), f"exit status {message!r} without a message"
    assert sorted(out.glob("checkpoint-*")) == before, "a checkpoint was written"
    return message


def test_the_base_command_lines_reach_training(inputs, tmp_path):
    """The control: without a case's flags every command gets past all its checks."""
    for command in COMMANDS:
        with pytest.raises(TrainingStarted):
            MAINS[command](base_argv(command, inputs["data"], tmp_path / command))


# ----------------------------------------------------------------------------- cases
# (case, commands, extra flags, fragments the message must hold). Flags and fragments are format
# strings over the `inputs` paths; "{out}" is the case's --output_dir. Each fragment names the
# offending value, or says what to do.
ALL = COMMANDS
CASES = [
    # 1. data folders
    ("data_path_missing", ALL, ["--data_path", "{missing}"],
     ["--data_path {missing} does not exist", "pass a folder holding"]),
    ("data_path_is_a_file", ALL, ["--data_path", "{a_file}"],
     ["--data_path {a_file} is a file, not a folder", "pass a folder holding"]),
    ("data_path_empty", ALL, ["--data_path", "{empty}"],
     ["--data_path {empty}: no images found", "put the images in class sub-folders"]),
    ("class_folders_without_images", ALL, ["--data_path", "{no_images}"],
     ["--data_path {no_images}: no images found", "2 class folders (cats, dogs) hold no image files",
      "put the images in class sub-folders"]),
    ("list_file_without_usable_line", ALL, ["--data_path", "{bad_list}"],
     ["train_map.txt: none of its 1 lines is usable", "gone/0001.jpg", "fix the list file"]),
    ("list_file_listing_nothing", ALL, ["--data_path", "{empty_list}"],
     ["--data_path {empty_list} ({empty_list}/train): no images found", "{empty_list}/train_map.txt lists none",
      "add '<path relative to {empty_list}/train/> <label>' lines to it"]),
    ("eval_data_path_missing", ("finetune",), ["--eval_data_path", "{missing}"],
     ["--eval_data_path {missing} does not exist", "--disable_eval_during_finetuning"]),
    ("eval_data_path_empty", ("finetune",), ["--eval_data_path", "{empty}"],
     ["--eval_data_path {empty}: no images found for the val split", "put the images in class sub-folders"]),
    # 2. the output folder
    ("output_dir_is_a_file", ALL, ["--output_dir", "{a_file}"],
     ["--output_dir {a_file} is a file, not a folder", "pass a folder"]),
    # 3. files named by flags
    ("resume_missing", ALL, ["--resume", "{missing_ckpt}"],
     ["--resume {missing_ckpt}: no such file", "leave --resume out"]),
    ("finetune_missing", ("finetune",), ["--finetune", "{missing_ckpt}"],
     ["--finetune '{missing_ckpt}' does not exist", "pass a checkpoint file", "--finetune none"]),
    ("tokenizer_weights_missing", ("pretrain",), ["--discrete_vae_weight_path", "{missing}"],
     ["--discrete_vae_weight_path {missing} does not exist", "model.yaml and last.ckpt",
      "leave the flag out for a RANDOM tokenizer"]),
    ("tokenizer_weights_folder_without_weights", ("pretrain",),
     ["--discrete_vae_type", "vqgan", "--discrete_vae_weight_path", "{empty}"],
     ["--discrete_vae_weight_path {empty}", "model.yaml"]),
    # 4. a checkpoint of another architecture: the keys and shapes that differ, and what to do
    ("resume_of_another_width", ("pretrain",), ["--resume", "{pretrain_small}"],
     ["--resume {pretrain_small} is a checkpoint of another architecture",
      "--model beit_small_patch16_224_8k_vocab (this run: beit_tiny_patch16_224_8k_vocab)",
      "shape mismatch: cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)", "more (shape mismatch)",
      "Run with the flags it was written with"]),
    ("auto_resume_of_another_width", ("pretrain",), ["--output_dir", "{out}"],
     ["auto-resume from {out}/checkpoint-0.pth", "another architecture",
      "shape mismatch: cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)", "another --output_dir",
      "--start_over"]),
    ("resume_of_another_vocabulary", ("tokenizer",), ["--resume", "{tokenizer_64}"],
     ["--resume {tokenizer_64} is a checkpoint of another architecture", "--vocab_size 64 (this run: 16)",
      "shape mismatch: tokenizer.codebook: checkpoint (64, 8) vs model (16, 8)",
      "Run with the flags it was written with"]),
    ("finetune_of_another_width", ("finetune",), ["--finetune", "{finetune_small}"],
     ["--finetune {finetune_small}", "shape mismatch: cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)",
      "pick the --model it was trained as"]),
    ("finetune_of_another_depth", ("finetune",), ["--finetune", "{finetune_shallow}"],
     ["--finetune {finetune_shallow}", "missing (in the model, not in the checkpoint): blocks.2.", "check --model"]),
    pytest.param(
        "resume_of_another_width", ("finetune",), ["--resume", "{finetune_resume_small}"],
        ["--resume {finetune_resume_small} is a checkpoint of another architecture",
         "--model beit_small_patch16_224 (this run: beit_tiny_patch16_224)",
         "shape mismatch: cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)",
         "Run with the flags it was written with"],
        id="resume_of_another_width-finetune"),
    # 5. masks that do not fit the window (64 px / patch 16: a 4x4 grid of 16 patches)
    ("more_masked_patches_than_the_grid", ("pretrain",), ["--num_mask_patches", "20"],
     ["--num_mask_patches 20 is more than the 16 patches of the 4x4 patch grid", "use at most 16"]),
    ("no_masked_patch", ("pretrain",), ["--num_mask_patches", "0"],
     ["--num_mask_patches must be at least 1, got 0", "use e.g. 6"]),
    ("min_block_above_max_block", ("pretrain",),
     ["--min_mask_patches_per_block", "5", "--max_mask_patches_per_block", "3"],
     ["--min_mask_patches_per_block 5 is more than --max_mask_patches_per_block 3",
      "lower the minimum or raise the maximum"]),
    ("min_block_above_masked_patches", ("pretrain",), ["--num_mask_patches", "6", "--min_mask_patches_per_block", "8"],
     ["--min_mask_patches_per_block 8 is more than --num_mask_patches 6",
      "use --min_mask_patches_per_block 6 or less"]),
    ("min_block_larger_than_the_grid", ("pretrain",),
     ["--num_mask_patches", "14", "--min_mask_patches_per_block", "12"],
     ["--min_mask_patches_per_block 12: no block fits the 4x4 patch grid",
      "use --min_mask_patches_per_block 9 or less"]),
    ("mask_ratio_masking_nothing", ("pretrain",), ["--mask_type", "random", "--mask_ratio", "0.01"],
     ["--mask_ratio 0.01 masks int(0.01 x 16) = 0", "use --mask_ratio of at least 0.0625"]),
    # 6. an input size the patches do not tile
    ("input_size_not_divisible_by_the_patch", ("pretrain", "finetune"), ["--input_size", "60"],
     ["--input_size 60 is not divisible by the patch size 16", "use --input_size 64 or 48"]),
    ("input_size_smaller_than_a_patch", ("pretrain", "finetune"), ["--input_size", "8"],
     ["--input_size 8 is not a positive size divisible by the patch size 16", "use --input_size 16"]),
    ("input_size_not_divisible_by_the_tokenizer", ("tokenizer",), ["--input_size", "60"],
     ["--input_size 60: the tokenizer downsamples by 8", "use a multiple of 8"]),
    # 7. a tokenizer grid other than the ViT's
    ("second_input_size_without_a_grid", ("pretrain",), ["--second_input_size", "48"],
     ["--second_input_size 48 cannot give the tokenizer the ViT's 4x4 grid", "use --second_input_size 32"]),
    ("second_input_size_of_another_grid", ("pretrain",), ["--second_input_size", "16"],
     ["--second_input_size 16 gives the tokenizer a 2x2 grid but the ViT has 4x4 patches",
      "use --second_input_size 32"]),
    # 8. fewer images than one batch per process (the original would train 0 steps)
    ("fewer_images_than_a_batch", ALL, ["--data_path", "{few}"],
     ["the dataset has 3 images, fewer than one batch of 8 per process x 1 processes",
      "lower --batch_size or add images"]),
    ("fewer_images_than_an_accumulated_step", ("finetune",), ["--batch_size", "6", "--update_freq", "3"],
     ["the dataset has 16 images, fewer than one batch of 6 per process x 3 accumulated batches (--update_freq)",
      "lower --batch_size or --update_freq"]),
    # 9. numbers out of range
    ("batch_size_0", ALL, ["--batch_size", "0"], ["--batch_size must be at least 1, got 0"]),
    ("epochs_0", ALL, ["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    ("epochs_negative", ALL, ["--epochs", "-2"], ["--epochs must be at least 1, got -2"]),
    ("lr_negative", ALL, ["--lr", "-0.001"], ["--lr must be at least 0, got -0.001"]),
    ("warmup_epochs_negative", ALL, ["--warmup_epochs", "-1"], ["--warmup_epochs must be at least 0, got -1"]),
    ("print_freq_0", ALL, ["--print_freq", "0"], ["--print_freq must be at least 1, got 0"]),
    ("update_freq_0", ("finetune",), ["--update_freq", "0"], ["--update_freq must be at least 1, got 0"]),
    ("vocab_size_1", ("tokenizer",), ["--vocab_size", "1"], ["--vocab_size must be at least 2, got 1"]),
]


def _expand(cases):
    for case in cases:
        marks, given_id = (), None
        if isinstance(case, type(pytest.param(None))):
            case, marks, given_id = case.values, case.marks, case.id
        name, commands, extra, fragments = case
        for command in commands:
            yield pytest.param(command, extra, fragments, marks=marks, id=given_id or f"{name}-{command}")


@pytest.mark.parametrize("command, extra, fragments", list(_expand(CASES)))
def test_wrong_input_stops_before_training_with_a_clear_message(command, extra, fragments, inputs, tmp_path):
    out = tmp_path / "out"
    if "{out}" in " ".join(extra):  # auto-resume: the newest checkpoint in --output_dir is of another model
        out.mkdir()
        shutil.copy(inputs["pretrain_small"], out / "checkpoint-0.pth")
    values = {key: str(path) for key, path in inputs.items()} | {"out": str(out)}
    argv = base_argv(command, inputs["data"], out) + [flag.format(**values) for flag in extra]
    message = refused(command, argv, out)
    for fragment in fragments:
        assert fragment.format(**values) in message, f"{fragment.format(**values)!r} not in:\n{message}"


@pytest.mark.parametrize("command", COMMANDS)
def test_fewer_images_than_a_batch_on_each_of_two_processes(command, inputs, tmp_path, monkeypatch):
    """16 images, batch 12: one process has a step, each of two has none (drop_last). Seen from rank 0
    of two (the launcher's process group is not needed: the check comes before any collective)."""
    for module in (engine_trainer,):
        monkeypatch.setattr(module, "init_distributed", lambda *args, **kwargs: DistInfo(rank=0, world_size=2))
    out = tmp_path / "out"
    message = refused(command, base_argv(command, inputs["data"], out) + ["--batch_size", "12"], out)
    assert "the dataset has 16 images, fewer than one batch of 12 per process x 2 processes" in message
    assert "lower --batch_size or add images" in message
