"""docs/ADDING_A_METHOD.md, executed: a new pre-training method (regress each masked patch's mean
colour) written only against mcbeit.methods.PretrainMethod, run by the one engine with the
pre-training task, checkpointed and resumed like mc-BEiT and BEiT. No second loop or skeleton."""
from __future__ import annotations

import json

import numpy as np
import timm
import torch
import torch.nn.functional as F

from mcbeit.config import resolve
from mcbeit.config.pretrain import PretrainConfig
from mcbeit.data.transforms import OneViewTransform
from mcbeit.engine.task import MeterSpec, StepOutput
from mcbeit.engine.trainer import Trainer
from mcbeit.methods import METHODS, PretrainMethod
from mcbeit.tasks.pretrain import PretrainTask
from tests.tasks.conftest import make_image_folder


# --- the code of docs/ADDING_A_METHOD.md ----------------------------------------------------------
class ViewAndMask:
    """One view (normalised) and a mask per image: ``(image, rng) -> (view (3,H,W), mask (N,))``."""

    def __init__(self, size: int, masks, mean, std):
        self.view = OneViewTransform(size, scale=(0.35, 1.0), interpolation="bicubic")
        self.masks, self.mean, self.std = masks, torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.accepts_opened_image = True

    def __call__(self, image, rng: np.random.Generator):
        view = (self.view(image, rng) - self.mean) / self.std                    # (3, H, W)
        return view, torch.from_numpy(np.ascontiguousarray(self.masks(rng), dtype=np.bool_).reshape(-1))


class PatchColour(PretrainMethod):
    """Predict each masked patch's mean colour (3 numbers) from the visible ones."""

    name = "patch_colour"
    meter = MeterSpec(("loss", "grad_norm", "loss_scale"), ("loss",),
                      {"loss": ("loss",), "opt": ("lr", "grad_norm")}, {"loss": ("loss", "{:.4f}")})

    def build(self, run):
        self.run, cfg = run, self.config
        return timm.create_model(cfg.model, img_size=cfg.input_size, vocab_size=3,  # lm_head: D -> 3 colours
                                 drop_path_rate=cfg.drop_path, init_values=cfg.layer_scale_init_value)

    def transform(self, window, masks, mean, std):
        return ViewAndMask(self.config.input_size, masks, mean, std)

    def step(self, batch, mark=None):
        run = self.run
        view, mask = batch[0].to(run.device), batch[1].to(run.device).bool()   # (B, 3, H, W), (B, N)
        patch = run.task.model.patch_embed.patch_size[0]
        target = F.avg_pool2d(view, patch).flatten(2).transpose(1, 2)[mask]     # (M, 3) mean colour per patch
        with run.precision.autocast():
            _, predicted = run.forward(view, mask)                               # (M, 3)
            loss = F.mse_loss(predicted.float(), target)
        return StepOutput(loss, {"loss": loss.detach()}, view.shape[0], batch[2].sum())

    def epoch_message(self, stats):
        return f"loss {stats['train_loss']:.4f}"
# ---------------------------------------------------------------------------------------------------


def test_a_new_method_trains_checkpoints_and_resumes_through_the_engine(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "patch_colour", PatchColour)
    data = make_image_folder(tmp_path / "data", n_per_class=8, size=64)
    out = tmp_path / "out"
    flags = {"data_path": str(data), "output_dir": str(out), "device": "cpu", "input_size": 64,
             "second_input_size": 32, "num_mask_patches": 6, "min_mask_patches_per_block": 2, "batch_size": 8,
             "epochs": 4, "warmup_epochs": 0, "lr": 2e-3, "save_ckpt_freq": 1, "num_workers": 0, "print_freq": 2}
    config = resolve(PretrainConfig, {**flags, "epochs": 2})
    Trainer(config, PretrainTask(config, method="patch_colour")).fit()
    config = resolve(PretrainConfig, {**flags, "accept_changed_flags": ("epochs",)})  # 4 epochs: auto-resume goes on
    Trainer(config, PretrainTask(config, method="patch_colour")).fit()

    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]                  # it learns the colours
    ckpt = torch.load(out / "checkpoint-3.pth", weights_only=True)
    assert ckpt["format"] == "mcbeit-pretrain-v1" and ckpt["model"]["lm_head.weight"].shape[0] == 3
    assert ckpt["step_in_epoch"] == ckpt["steps_per_epoch"] == 4
