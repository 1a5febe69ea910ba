"""Semantic segmentation (issue 18): one UperNet training step beside transformers'
``BeitForSemanticSegmentation`` of the same size, and the sliding-window evaluation of one image.

The step: forward (backbone, neck, UPerHead, auxiliary FCNHead), the two cross-entropies (auxiliary x0.4),
backward, AdamW. Phases: ``fwd+loss+bwd`` and ``optimizer`` (the segmentation task does not mark its forward
and loss apart, so the engine's first mark, ``backward``, closes all three; the reference's split is kept in
the JSON).

- ours: the engine's own update (:func:`mcbeit.engine.loop.run_update`) on a run the engine built
  (:meth:`mcbeit.engine.trainer.Trainer.ready`) for :class:`~mcbeit.tasks.segmentation.SegmentationTask`
  from :class:`~mcbeit.config.segmentation.SegmentationConfig`, the default preset (mc-BEiT's ADE20K recipe:
  150 classes, layer decay 0.9 over ``backbone.*``, plain BatchNorm in one process). The task reads its number
  of classes from the data, so the run points ``--data_path`` at a stub folder in ADE20K's layout (one small
  image; nothing of it reaches the step, whose batch is random images and labels with ignored pixels).
- reference: transformers' ``BeitForSemanticSegmentation`` (random weights) with the same sizes: relative
  position bias per block at the crop's grid, layer scale 0.1, drop path 0.1, ``out_indices`` [3, 5, 7, 11],
  UPerHead channels = hidden size, auxiliary head of 256 channels weighted 0.4, 150 labels, 255 ignored; its
  own loss (``labels=``), backward, ``torch.optim.AdamW`` with torch's defaults for the device (what a
  transformers user writes). It is a speed reference, NOT a formulation of the same model: transformers
  reads ``out_indices`` 1-based into its hidden states (index 0 = the embeddings), so its neck is fed the
  outputs of blocks 1, 3, 5, 9 (0-based) where the original and ours take blocks 3, 5, 7, 11; its
  cross-entropy averages over the labelled pixels (ours: mmseg 0.11's mean over all pixels); its weights
  are initialised its own way; and its UPerHead width follows the hidden size. Same work per step, up
  to the sequence of blocks the neck taps.

The evaluation: :func:`mcbeit.evaluation.segmentation.predict` as the evaluation loop runs it (inference
mode, the model in eval mode: no auxiliary head) on a 512 x 683 image (ADE20K's common 4:3 after the
(2048, 512) keep-ratio resize): two 512 x 512 windows 171 pixels apart, decoded in one batch (ours), and
one window at a time (``window_batch=1``: the original ``slide_inference``'s order), then the logits
resized to the image and the argmax.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mcbeit.bench.measure import count_flops, peak_memory, synchronize
from mcbeit.bench.step import Formulation, amp_dtype_of, side_by_side, step
from mcbeit.config import resolve

SIZES = {"tiny": "beit_tiny_patch16_224", "small": "beit_small_patch16_224", "base": "beit_base_patch16_224",
         "large": "beit_large_patch16_224"}
SHORT = {"tiny": "Ti", "small": "S", "base": "B", "large": "L"}
NUM_CLASSES, IGNORE = 150, 255
LR, WEIGHT_DECAY = 8e-5, 0.05            # the default preset's (mc-BEiT's ADE20K config)


def _width(size: str) -> int:
    """UPerHead channels: the hidden size, as transformers builds it (768 at base: the original's)."""
    from mcbeit.models.segmentation import backbone_size

    return backbone_size(SIZES[size])[0]


def _ade20k_stub(root: Path) -> Path:
    """A folder in ADE20K's layout holding one 32 x 32 training image and its label: enough for the task
    to build its dataset (150 classes) and so its model."""
    for kind, suffix, array in (("images", "jpg", np.full((32, 32, 3), 128, np.uint8)),
                                ("annotations", "png", np.ones((32, 32), np.uint8))):
        folder = root / kind / "training"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"stub.{suffix}")
    return root


def build_run(size: str = "base", input_size: int = 512, amp: str = "fp32", device: str = "cpu"):
    """The product's segmentation run (model, optimizer, strategy), built by the engine as ``mcbeit-seg`` builds it."""
    from mcbeit.config.segmentation import SegmentationConfig
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.segmentation import SegmentationTask

    model = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve(SegmentationConfig, {
            "data_path": str(_ade20k_stub(Path(tmp))), "model": model, "crop_size": input_size,
            "channels": _width(size), "pretrained": "none", "no_validate": True, "output_dir": "", "device": device,
            "amp": "off" if amp == "fp32" else amp, "lr": LR, "weight_decay": WEIGHT_DECAY})
        return Trainer(config, SegmentationTask(config)).ready(steps_per_epoch=10 ** 6)


def hf_reference(size: str = "base", input_size: int = 512, device: str = "cpu"):
    """transformers' ``BeitForSemanticSegmentation`` of ``size`` at ``input_size`` (random weights, train mode)."""
    from transformers import BeitConfig, BeitForSemanticSegmentation

    from mcbeit.models.segmentation import backbone_size

    dim, depth, heads = backbone_size(SIZES[size])
    config = BeitConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                        intermediate_size=4 * dim, image_size=input_size, patch_size=16,
                        use_relative_position_bias=True, use_shared_relative_position_bias=False,
                        use_absolute_position_embeddings=False, layer_scale_init_value=0.1, drop_path_rate=0.1,
                        out_indices=[3, 5, 7, 11], use_auxiliary_head=True, auxiliary_channels=256,
                        auxiliary_loss_weight=0.4, num_labels=NUM_CLASSES, semantic_loss_ignore_index=IGNORE)
    torch.manual_seed(0)
    return BeitForSemanticSegmentation(config).to(device).train()


class HFStep:
    """One training step of transformers' model: forward with ``labels`` (its loss), backward, AdamW."""

    def __init__(self, model, amp_dtype: torch.dtype | None = None):
        self.model, self.amp_dtype = model, amp_dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def __call__(self, batch, mark: Callable[[str], None] | None = None) -> torch.Tensor:
        mark = mark or (lambda phase: None)
        images, labels = batch
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            out = self.model(pixel_values=images, labels=labels)
        mark("forward")                                   # its loss is computed inside the forward
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        mark("backward")
        self.optimizer.step()
        mark("optimizer")
        return out.loss.detach()


def make_batch(batch_size: int, input_size: int, device: torch.device, seed: int = 0):
    """Normalised-looking images (B,3,S,S) and labels (B,S,S) in 0..149 with ~10% ignored (255) pixels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch_size, input_size, input_size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE
    return images.to(device), labels.to(device)


def _merge_phases(figures: dict) -> None:
    figures["fwd_loss_bwd_s"] = sum(figures.get(f"{phase}_s", 0.0) for phase in ("forward", "loss", "backward"))


def run_segmentation_step(size: str = "base", batch_size: int = 2, input_size: int = 512, amp: str = "fp32",
                          steps: int = 2, warmup: int = 1, device: str = "cpu", memory: bool = True,
                          flops: bool = True) -> dict:
    """Median seconds per phase and per step, images/s, peak step memory and FLOPs of our UperNet step and
    of transformers' ``BeitForSemanticSegmentation`` of the same size on the same batch (alternating)."""
    run = build_run(size, input_size, amp, device)
    reference = HFStep(hf_reference(size, input_size, str(run.device)), amp_dtype_of(amp))
    batch = make_batch(batch_size, input_size, run.device)
    run.task.model.train()
    optimizer = run.strategy.optimizer
    row = {"config": f"upernet {SHORT[size]}@{input_size} b{batch_size} {amp}", "model": SIZES[size],
           "batch_size": batch_size, "input_size": input_size, "amp": amp, "device": str(run.device), "steps": steps,
           "parameters_m": {"ours": sum(p.numel() for p in run.task.model.parameters()) / 1e6,
                            "reference": sum(p.numel() for p in reference.model.parameters()) / 1e6},
           "loss_abs_diff": None}   # different models (blocks fed to the neck, loss reduction): not compared
    row.update(side_by_side(Formulation(lambda mark=None: step(run, batch, mark),
                                        lambda: optimizer.zero_grad(set_to_none=True)),
                            Formulation(lambda mark=None: reference(batch, mark),
                                        lambda: reference.optimizer.zero_grad(set_to_none=True)),
                            run.device, batch_size, warmup, steps, memory, flops))
    for who in ("ours", "reference"):
        _merge_phases(row[who])
    return row


def run_slide_eval(size: str = "base", input_size: int = 512, image_size: tuple[int, int] = (512, 683),
                   amp: str = "fp32", repeats: int = 2, warmup: int = 1, device: str = "cpu",
                   memory: bool = True) -> dict:
    """Seconds (median over ``repeats``, after ``warmup``) and peak memory of the sliding-window prediction of
    one ``image_size`` image with the segmentor in eval mode: windows batched (ours, the evaluation loop's
    default) and one at a time (the original's order)."""
    from mcbeit.engine.distributed import resolve_device
    from mcbeit.evaluation.segmentation import predict, slide_windows
    from mcbeit.models.segmentation import build_segmentor

    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build_segmentor(SIZES[size], num_classes=NUM_CLASSES, img_size=input_size, channels=_width(size),
                            init="original").to(dev).eval()
    h, w = image_size
    image = torch.randn(3, h, w, generator=torch.Generator().manual_seed(0)).to(dev)
    stride = input_size * 2 // 3                                   # the configs' 341 at 512
    windows = len(slide_windows(h, input_size, stride)) * len(slide_windows(w, input_size, stride))
    amp_dtype = amp_dtype_of(amp)

    def encode(x):
        with torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            return model.encode_decode(x)

    def job(window_batch: int):
        def once():
            with torch.inference_mode():
                pred = predict(encode, [(image, False)], (h, w), NUM_CLASSES, "slide", input_size, stride,
                               window_batch)                       # (H,W)
            synchronize(dev)
            return pred
        return once

    row = {"config": f"slide {SHORT[size]}@{input_size} {h}x{w} {amp}", "model": SIZES[size], "image": [h, w],
           "crop": input_size, "stride": stride, "windows": windows, "amp": amp, "device": str(dev),
           "repeats": repeats}
    jobs = {"ours": (4, job(4)), "reference": (1, job(1))}
    seconds: dict[str, list[float]] = {who: [] for who in jobs}
    for i in range(warmup + repeats):                              # alternating, as the step table
        for who, (_, once) in jobs.items():
            started = time.perf_counter()
            once()
            if i >= warmup:
                seconds[who].append(time.perf_counter() - started)
    for who, (window_batch, once) in jobs.items():
        median = statistics.median(seconds[who])
        row[who] = {"window_batch": window_batch, "s_per_image": median, "images_per_s": 1.0 / median}
        if memory:
            row[who]["peak_bytes"] = peak_memory(once, dev)
    row["gflop_per_image"] = count_flops(jobs["ours"][1]) / 1e9
    row["speedup"] = row["reference"]["s_per_image"] / row["ours"]["s_per_image"]
    return row


def print_slide(row: dict) -> None:
    print(f"\nSliding-window evaluation, {row['config']} ({row['windows']} windows of {row['crop']}, stride "
          f"{row['stride']}), median seconds per image")
    for who, label in (("ours", "windows batched"), ("reference", "one window at a time")):
        f = row[who]
        peak = "" if "peak_bytes" not in f else f", peak {f['peak_bytes'] / 2 ** 20:.0f} MB"
        print(f"  {label:<22} {f['s_per_image']:7.3f} s ({f['images_per_s']:.2f} images/s){peak}")
    print(f"  -> speed-up {row['speedup']:.2f}x ({row['gflop_per_image']:.0f} GFLOP per image)", flush=True)
