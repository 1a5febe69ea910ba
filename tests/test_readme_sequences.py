"""The README's command sequences run as written (issue 14, case 5), one after another in one folder,
as a researcher following the README runs them: the installed commands, real processes, the
embedded images (and a real image folder where the README names the user's own, /data/microscopy).

Only speed flags are appended (fewer epochs, smaller images, no loader workers); they leave every
command's output folder as the README has it, and the README names no file that only its full
run writes (tokenizer.pth is written at the end of any tokenizer training)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tasks.conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
USER_DATA = "/data/microscopy"  # the README's stand-in for the user's images

# Appended to each command (argparse keeps the last value of a flag given twice).
SPEED = {
    "mcbeit-pretrain": ["--input_size", "64", "--second_input_size", "32", "--num_mask_patches", "6",
                        "--min_mask_patches_per_block", "2", "--epochs", "1", "--num_workers", "0"],
    "mcbeit-tokenizer train": ["--input_size", "32", "--epochs", "1", "--num_workers", "0"],
    "mcbeit-tokenizer inspect": ["--input_size", "32", "--num_images", "4", "--histogram_images", "16",
                                 "--num_workers", "0"],
    "mcbeit-finetune": ["--input_size", "64", "--epochs", "1", "--num_workers", "0"],
    "mcbeit-export": [],
    "mcbeit-vqkd": ["--input_size", "32", "--teacher_input_size", "32", "--codebook_n_emd", "64", "--epochs", "1",
                    "--num_workers", "0"],
    "mcbeit-pretrain-conmim": ["--input_size", "64", "--proj_hidden_dim", "64", "--epochs", "1", "--num_workers", "0"],
    "mcbeit-seg train": ["--max_iters", "4", "--eval_interval", "2", "--checkpoint_interval", "2", "--crop_size", "32",
                         "--img_scale", "128", "32", "--num_workers", "0"],
    "mcbeit-seg test": ["--num_workers", "0"],
    "mcbeit-pretrain-beitv2": ["--input_size", "64", "--second_input_size", "64", "--num_mask_patches", "6",
                               "--min_mask_patches_per_block", "2", "--epochs", "1", "--num_workers", "0"],
}


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, `a && b` split; lines
    with ${PLACEHOLDERS} (the cluster recipes) are not runnable here and are left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("#")[0].strip() for line in joined.splitlines()]
    return [part.strip() for line in lines if line and "${" not in line for part in line.split("&&")]


def bash_block_after(marker: str) -> str:
    return re.search(re.escape(marker) + r".*?```bash\n(.*?)```", README, re.S).group(1)


def paragraph_with(words: str) -> str:
    (found,) = [p for p in README.split("\n\n") if words in p]
    return " ".join(found.split())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the embedded images, generated once for the module


@pytest.fixture(scope="module")
def researcher(tmp_path_factory, cache) -> Path:
    """The folder of a researcher who ran the README's first command, `mcbeit-pretrain`."""
    cwd = tmp_path_factory.mktemp("researcher")
    run("mcbeit-pretrain", cwd, cache)
    return cwd


def run(command: str, cwd: Path, cache: Path, data: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    argv = shlex.split(command.replace(USER_DATA, str(data)) if data else command)
    program = next(k for k in sorted(SPEED, key=len, reverse=True) if " ".join(argv).startswith(k))
    script = Path(sys.executable).parent / argv[0]
    exe = str(script) if script.exists() else shutil.which(argv[0])
    assert exe, f"{argv[0]} is not installed: run the README's install command first"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(cwd), "MCBEIT_CACHE": str(cache),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([exe, *argv[1:], *SPEED[program]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, f"{command}\nexit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_the_tokenizer_then_pretraining_sequence_runs_after_the_no_argument_run(researcher, cache):
    """The README's opening `mcbeit-pretrain`, then its one-line tokenizer sequence ("With no flags,
    `mcbeit-tokenizer train` ...; `mcbeit-pretrain --discrete_vae_type customized ...` then ...")."""
    sequence = re.findall(r"`(mcbeit-[^`]+)`", paragraph_with("With no flags, `mcbeit-tokenizer train`"))
    assert [c.split(" --")[0] for c in sequence] == ["mcbeit-tokenizer train", "mcbeit-pretrain"], sequence
    tmp_path = researcher
    run(sequence[0], tmp_path, cache)
    assert (tmp_path / "output" / "mcbeit_tokenizer" / "tokenizer.pth").is_file()
    assert "tokenizer customized (vocabulary 1024)" in run(sequence[1], tmp_path, cache).stderr

    # the same command without the README's --output_dir: the no-argument run's folder, another
    # experiment; it stops before training and says which flags differ and how to go on
    reused = re.sub(r" --output_dir \S+", "", sequence[1])
    folder = tmp_path / "output" / "mcbeit_pretrained"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    stopped = run(reused, tmp_path, cache, check=False)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "--discrete_vae_weight_path: none in the checkpoint, ./output/mcbeit_tokenizer/tokenizer.pth in this " \
           "run" in stopped.stderr
    assert "another --output_dir" in stopped.stderr and "Traceback" not in stopped.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} == before


def test_the_own_tokenizer_block_runs_as_written(tmp_path, cache):
    block = commands(bash_block_after("Your own tokenizer"))
    assert [c.split(" --")[0] for c in block] == ["mcbeit-tokenizer train", "mcbeit-pretrain",
                                                  "mcbeit-tokenizer inspect"], block
    assert all(USER_DATA in c for c in block)
    data = make_image_folder(tmp_path / "microscopy", n_per_class=16, size=64)  # 64 images: one batch
    logs = [run(command, tmp_path, cache, data).stderr for command in block]
    assert "tokenizer customized (vocabulary 8192)" in logs[1]  # pre-trained with the tokenizer just trained
    assert (tmp_path / "output" / "microscopy_pretrained" / "checkpoint-0.pth").is_file()
    assert list((tmp_path / "output").glob("tokenizer_inspect*.png"))


def test_the_conmim_block_runs_as_written(tmp_path, cache):
    """ConMIM on the embedded images, then fine-tuning its folder: the newest EMA teacher (checkpoint_copy)."""
    block = commands(bash_block_after("## ConMIM"))
    assert [c.split(" --")[0] for c in block] == ["mcbeit-pretrain-conmim", "mcbeit-finetune"], block
    run(block[0], tmp_path, cache)
    out = tmp_path / "output"
    assert (out / "conmim" / "checkpoint-0.pth").is_file() and (out / "conmim" / "checkpoint_copy-0.pth").is_file()
    finetune = run(block[1], tmp_path, cache).stderr
    assert "its newest EMA teacher, checkpoint_copy-0.pth" in finetune
    assert (out / "conmim_finetuned" / "checkpoint-best.pth").is_file()


def test_the_pretrain_then_finetune_block_runs_as_written(researcher, cache):
    """After the README's first command: its `mcbeit-pretrain` then finds the run done, and the
    fine-tuning commands each write their own folder."""
    block = commands(bash_block_after("## Fine-tuning, linear probing, export"))
    assert [c.split(" ")[0] for c in block] == ["mcbeit-pretrain", "mcbeit-finetune", "mcbeit-finetune",
                                                "mcbeit-export"], block
    tmp_path = researcher
    for command in block:
        proc = run(command, tmp_path, cache)
        if command == "mcbeit-finetune":
            assert "mcbeit_pretrained/checkpoint-0.pth" in proc.stderr  # it fine-tuned the pre-training's weights
    out = tmp_path / "output"
    assert (out / "mcbeit_finetuned" / "checkpoint-best.pth").is_file()
    assert (out / "mcbeit_finetuned_scratch" / "checkpoint-best.pth").is_file()
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_the_beitv2_block_runs_as_written(researcher, cache):
    """After the README's first command: VQ-KD distilled from that run's newest checkpoint (a folder as
    --teacher_weight), then BEiT v2 pre-training on the tokenizer.pth it wrote."""
    block = commands(bash_block_after("## BEiT v2"))
    assert [c.split(" --")[0] for c in block] == ["mcbeit-vqkd", "mcbeit-pretrain-beitv2"], block
    tmp_path = researcher
    vqkd = run(block[0], tmp_path, cache).stderr
    assert "its newest checkpoint, checkpoint-0.pth" in vqkd and "RANDOM" not in vqkd
    assert (tmp_path / "output" / "vqkd" / "tokenizer.pth").is_file()
    v2 = run(block[1], tmp_path, cache).stderr
    assert "Loaded VQ-KD tokenizer" in v2 and "(64 codes x 32)" in v2
    assert (tmp_path / "output" / "beitv2" / "checkpoint-0.pth").is_file()


def test_the_segmentation_block_runs_as_written(researcher, cache):
    """After the README's first command: UperNet from that run's newest checkpoint, the same from scratch, then the
    test command on the best checkpoint alone (its settings are in it), multi-scale + flip."""
    block = commands(bash_block_after("## Semantic segmentation"))
    assert [" ".join(c.split()[:2]) for c in block] == ["mcbeit-seg train"] * 2 + ["mcbeit-seg test"], block
    tmp_path = researcher
    first = run(block[0], tmp_path, cache).stderr
    assert re.search(r"backbone from \S*mcbeit_pretrained/checkpoint-0.pth", first), first[-3000:]
    scratch = run(block[1], tmp_path, cache).stderr
    assert "RANDOM initialisation" in scratch
    out = tmp_path / "output"
    assert (out / "mcbeit_seg" / "checkpoint-best.pth").is_file()
    assert (out / "mcbeit_seg_scratch" / "checkpoint-best.pth").is_file()
    tested = run(block[2], tmp_path, cache).stderr
    assert "(multi-scale + flip)" in tested and re.search(r"mIoU \d+\.\d+, mAcc", tested)
