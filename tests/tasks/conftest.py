"""Small real image folders for the end-to-end pre-training tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]


def _draw(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    """A textured background with one class-specific shape: enough structure for MIM to learn."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    tilt = rng.uniform(-80, 80, 3)
    bg = base[None, None] + tilt[None, None] * (xx[..., None] * rng.uniform(-1, 1) + yy[..., None] * rng.uniform(-1, 1))
    bg += rng.normal(0, 8, bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    c = tuple(int(v) for v in rng.uniform(0, 255, 3))
    r = int(size * rng.uniform(0.2, 0.4))
    cx, cy = (int(v) for v in rng.uniform(r, size - r, 2))
    box = [cx - r, cy - r, cx + r, cy + r]
    [d.ellipse, d.rectangle, lambda b, fill: d.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill),
     lambda b, fill: [d.rectangle([b[0], y, b[2], y + 3], fill=fill) for y in range(b[1], b[3], 8)]][cls](box, fill=c)
    return img


def make_image_folder(root: Path, n_per_class: int, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in range(4):
        folder = root / f"class_{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            _draw(rng, cls, size).save(folder / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_per_class=16)


@pytest.fixture(scope="session")
def list_layout(tmp_path_factory) -> Path:
    """The seeds' layout: <root>/train/<relative path> plus <root>/train_map.txt."""
    root = tmp_path_factory.mktemp("imnet")
    make_image_folder(root / "train", n_per_class=8, seed=1)
    lines = [f"{p.relative_to(root / 'train').as_posix()} {int(p.parent.name[-1])}"
             for p in sorted((root / "train").rglob("*.jpg"))]
    (root / "train_map.txt").write_text("\n".join(lines) + "\n")
    return root


def free_port() -> int:
    """A TCP port free on the loopback now, for a test's process group to meet on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: what a launcher (or an in-process DeepSpeed run of an earlier test in this worker) leaves in os.environ: a command
#: a test starts must see a clean machine, as a user's shell does
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MCBEIT_LAUNCH_DIR",
                      "MCBEIT_LAUNCHER_PID")


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MCBEIT_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(cmd: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


PYTHON = sys.executable
# Small and fast geometry for tests: 64 px for the ViT (4x4 patches), 32 px for the tokenizer.
FAST = ["--model", "beit_tiny_patch16_224_8k_vocab", "--input_size", "64", "--second_input_size", "32",
        "--mask_type", "block", "--num_mask_patches", "6", "--min_mask_patches_per_block", "2",
        "--num_workers", "0", "--print_freq", "2", "--seed", "0"]


# The mc-BEiT README's pre-training command, word for word.
SEED_README_COMMAND = """
python -m torch.distributed.launch --nproc_per_node=16 run_mcbeit_pretraining.py \\
        --data_path ${DATA_PATH} --output_dir ${OUTPUT_DIR} \\
        --model beit_base_patch16_224_8k_vocab --discrete_vae_weight_path ${TOKENIZER_PATH} \\
        --batch_size 128 --lr 1.5e-3 --warmup_epochs 10 --epochs 800 \\
        --clip_grad 3.0 --drop_path 0.1 --layer_scale_init_value 0.1 \\
        --mask_type 'random' \\
        --imagenet_default_mean_and_std \\
        --omega 0.2 \\
        --temp 4.0 \\
        --temp_warmup 4.0 \\
"""


@pytest.fixture(scope="session")
def labelled_root(tmp_path_factory) -> Path:
    """A root with train/ and val/ class folders (4 classes, 16 + 6 images each): the k-NN monitor's layout."""
    root = tmp_path_factory.mktemp("labelled")
    make_image_folder(root / "train", n_per_class=16, seed=5)
    make_image_folder(root / "val", n_per_class=6, seed=6)
    return root


@pytest.fixture(scope="session")
def embedded_subset(tmp_path_factory) -> Path:
    """6 images of each of the embedded dataset's 10 classes (its real JPEGs), as an image folder."""
    import shutil

    from mcbeit.data.embedded import EMBEDDED_CLASSES, embedded_dataset_root

    source = embedded_dataset_root() / "train"
    root = tmp_path_factory.mktemp("embedded") / "train"
    for name in EMBEDDED_CLASSES:
        (root / name).mkdir(parents=True)
        for f in sorted((source / name).glob("*.jpg"))[:6]:
            shutil.copy(f, root / name / f.name)
    return root


def read_log(out: Path) -> list[dict]:
    """The rows of ``<out>/log.txt`` (one JSON record per epoch / round)."""
    import json

    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="session")
def pretrained_checkpoint(image_folder, tmp_path_factory) -> Path:
    """A checkpoint of mcbeit-pretrain (tiny, one epoch on the test images): what the dense tasks start from."""
    from mcbeit.cli import pretrain

    out = tmp_path_factory.mktemp("pretrained")
    pretrain.run(pretrain.get_args_parser().parse_args(
        ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu", *FAST, "--batch_size", "16",
         "--epochs", "1", "--warmup_epochs", "0"]))
    return out / "checkpoint-0.pth"
