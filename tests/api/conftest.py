"""Real runs of the commands (tiny models, a few steps, one thread) whose files the Python API reads: each fixture
trains through the command's own entry point and returns the run's output folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tasks.conftest import FAST as PRETRAIN_FAST
from tests.tasks.conftest import image_folder, make_image_folder, pretrained_checkpoint  # noqa: F401  (fixtures)

#: a classifier fine-tuned at 64 px, 4 classes (class_0 .. class_3)
FINETUNE_FAST = ["--model", "beit_tiny_patch16_224", "--input_size", "64", "--batch_size", "8", "--num_workers", "0",
                 "--device", "cpu", "--print_freq", "2", "--aa", "", "--reprob", "0", "--warmup_epochs", "0",
                 "--epochs", "1", "--lr", "2e-3"]


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> Path:
    """<root>/train/<class>/ and <root>/val/<class>/ with 4 classes of 64 px images."""
    root = tmp_path_factory.mktemp("api_cls")
    make_image_folder(root / "train", n_per_class=4, size=64, seed=1)
    make_image_folder(root / "val", n_per_class=2, size=64, seed=2)
    return root


def _classifier_run(out: Path, main, data: Path, pretrained: Path, *extra: str) -> Path:
    """``main`` (mcbeit-finetune / mcbeit-linprobe) from ``pretrained`` on ``data``, one epoch."""
    with torch.random.fork_rng():
        assert main(["--data_path", str(data), "--output_dir", str(out), *FINETUNE_FAST, "--finetune",
                     str(pretrained), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def finetuned_run(cls_data, pretrained_checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    """mcbeit-finetune from the pre-training fixture's checkpoint."""
    from mcbeit.cli import finetune

    return _classifier_run(tmp_path_factory.mktemp("api_finetuned"), finetune.main, cls_data, pretrained_checkpoint)


@pytest.fixture(scope="session")
def linprobe_run(cls_data, pretrained_checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    """mcbeit-linprobe of block 2, CLS token."""
    from mcbeit.cli import finetune

    return _classifier_run(tmp_path_factory.mktemp("api_linprobe"), finetune.main_linprobe, cls_data,
                           pretrained_checkpoint, "--probe_layer", "2", "--probe_pool", "cls", "--lr", "0.1")


@pytest.fixture(scope="session")
def vq_tokenizer_file(tmp_path_factory) -> Path:
    """A customized VQ tokenizer (the kind mcbeit-tokenizer trains: it has a decoder), random weights, 64 words."""
    from mcbeit.tokenizers.custom import CustomTokenizer, save_custom_tokenizer

    torch.manual_seed(3)
    tok = CustomTokenizer(image_size=32, head="vq", vocab_size=64, n_hid=16, n_blk_per_group=1, embed_dim=8)
    path = tmp_path_factory.mktemp("api_tok") / "tokenizer.pth"
    save_custom_tokenizer(tok, path)
    return path


@pytest.fixture(scope="session")
def tokenized_pretrain_run(image_folder, vq_tokenizer_file, tmp_path_factory) -> Path:  # noqa: F811
    """mcbeit-pretrain with that tokenizer (its path stays in the checkpoint's flags), one epoch."""
    from mcbeit.cli import pretrain

    out = tmp_path_factory.mktemp("api_pretrain_vq")
    with torch.random.fork_rng():
        pretrain.run(pretrain.get_args_parser().parse_args(
            ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu", *PRETRAIN_FAST,
             "--discrete_vae_type", "customized", "--discrete_vae_weight_path", str(vq_tokenizer_file),
             "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0"]))
    return out


def _dense_run(out: Path, cli, argv: list[str]) -> Path:
    """``cli``'s train command (mcbeit-seg / mcbeit-det) from random initialisation, 2 iterations in one round."""
    with torch.random.fork_rng():
        cli.run(cli.get_args_parser("train").parse_args(["--output_dir", str(out), *argv, "--pretrained", "none"]))
    return out


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> Path:
    """mcbeit-seg on the embedded scenes: a tiny UperNet at 32 px."""
    from mcbeit.cli import segmentation
    from tests.tasks.test_segmentation import SEG_FAST

    return _dense_run(tmp_path_factory.mktemp("api_seg"), segmentation,
                      [*SEG_FAST, "--max_iters", "2", "--eval_interval", "2", "--checkpoint_interval", "2"])


@pytest.fixture(scope="session")
def det_run(tmp_path_factory) -> Path:
    """mcbeit-det on the embedded scenes: a tiny Mask R-CNN at 64 px."""
    from mcbeit.cli import detection
    from tests.tasks.test_detection import DET_FAST

    return _dense_run(tmp_path_factory.mktemp("api_det"), detection,
                      [*DET_FAST, "--max_iter", "2", "--eval_period", "2", "--checkpoint_period", "2"])
