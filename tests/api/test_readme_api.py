"""The README's "Python API" code blocks, run as written: in a folder where mcbeit-pretrain and mcbeit-finetune have
run (the fixtures' real runs, copied to the README's paths), with the seed's released BEiT v2 file (mmpretrain's
layout, random weights) in torch hub's cache."""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tasks.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

V2_NAME = "beitv2_beit-base-p16_8xb256-amp-coslr-300e_in1k"


def api_blocks() -> list[str]:
    """The python blocks of the README's Python API section."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"\n## Python API\n(.*?)\n## ", text, re.S).group(1)
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, finetuned_run, pretrained_checkpoint):
    shutil.copytree(finetuned_run, tmp_path / "output" / "mcbeit_finetuned")
    (tmp_path / "output" / "mcbeit_pretrained").mkdir()
    shutil.copy(pretrained_checkpoint, tmp_path / "output" / "mcbeit_pretrained" / pretrained_checkpoint.name)
    (tmp_path / "demo").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(tmp_path / "demo" / "bird.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _released_v2_file() -> dict:
    """mmpretrain's BEiT v2 base pre-training file (its key names, random weights) where torch hub caches its URL."""
    import timm

    from mcbeit.api.models import SEED_MODELS, hub_cache_path
    from tests.models.test_released_v2 import to_mmpretrain

    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224_8k_vocab_cls_pt", vocab_size=8192, early_layers=9,
                              head_layers=2)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
    path = hub_cache_path(SEED_MODELS[V2_NAME].url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"meta": {"epoch": 300}, "state_dict": to_mmpretrain(sd)}, path)
    return sd


def test_the_readme_api_blocks_run_as_written(readme_folder, capsys, monkeypatch):
    import mcbeit

    blocks = api_blocks()
    assert len(blocks) == 2 and "get_model" in blocks[0] and "inference_model" in blocks[0]
    monkeypatch.setenv("TORCH_HOME", str(readme_folder / "torch"))  # torch hub's cache: <TORCH_HOME>/hub/checkpoints
    # the second block's pretrained=True: first with nothing cached (a clear error), then with the file there
    with pytest.raises(mcbeit.InputError, match="nothing is downloaded.*a157be30.pth"):
        mcbeit.get_model(V2_NAME, pretrained=True)
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] in {"class_0", "class_1", "class_2", "class_3"}  # the class folders' names
    assert 0.0 < float(printed[1]) <= 1.0
    assert printed[2] == "<class 'torch.Tensor'> torch.Size([1, 192])"
    assert printed[3] == "(4, 4)"  # 64 px, 16-pixel patches

    sd = _released_v2_file()
    scope = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert V2_NAME in capsys.readouterr().out
    early, last = scope["early"], scope["last"]
    assert early.shape == last.shape == (1, 197, 768)
    loaded = scope["model"].state_dict()
    assert torch.equal(loaded["blocks.4.attn.qkv.weight"], sd["blocks.4.attn.qkv.weight"])
    assert torch.equal(loaded["cls_pt_layers.1.mlp.fc2.weight"], sd["cls_pt_layers.1.mlp.fc2.weight"])
