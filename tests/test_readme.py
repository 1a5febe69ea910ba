"""The README's first commands, as written: `mcbeit-pretrain` with no flags on a fresh cache."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first code block (comments stripped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_opens_with_install_then_main_job_then_tests():
    text = (REPO / "README.md").read_text()
    assert readme_commands() == ['pip install -e ".[dev]"', "mcbeit-pretrain"]
    second = re.findall(r"```bash\n(.*?)```", text, re.S)[1]
    assert second.split("#")[0].strip().startswith("pytest")


def test_no_argument_run_pretrains_on_embedded_data_and_says_where(tmp_path):
    (command,) = [c for c in readme_commands() if not c.startswith("pip")]
    argv = shlex.split(command)
    script = Path(sys.executable).parent / argv[0]
    exe = str(script) if script.exists() else shutil.which(argv[0])
    assert exe, f"{argv[0]} is not installed: run the README's install command first"
    env = dict(os.environ, MCBEIT_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([exe, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "output" / "mcbeit_pretrained"
    assert str(out) in proc.stderr  # it says where it wrote, as an absolute path
    assert "RANDOM" in proc.stderr  # and that the tokenizer is random
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.5
    assert log[-1]["train_mlm_acc"] > 100 / 8192  # far above chance
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-3.pth"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "cache" / "embedded-v2").is_dir()
    # the k-NN monitor measured every epoch on the embedded val split, and the epoch lines say so
    assert all(r["knn_val_images"] == 200 and 0 <= r["knn_top1"] <= 100 for r in log)
    assert proc.stderr.count("k-NN top-1") == 4
