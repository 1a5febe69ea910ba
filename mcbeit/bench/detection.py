"""COCO detection (issue 19): one Mask R-CNN training step of the default preset's model (ViT-B at 1024, 80
classes) with and without activation checkpointing, and the evaluation of one image.

The step: the detector's forward, which computes its own losses (backbone, pyramid and FPN, RPN with its two losses,
RoI sampling, box head and mask head with theirs: torchvision's Mask R-CNN does all of it inside ``model(images,
targets)``), backward, AdamW. Phases where the engine marks them: ``forward`` (the task's mark after the forward:
forward and losses together), ``backward``, ``optimizer``.

- the run: the engine's own update (:func:`mcbeit.engine.loop.run_update`) on a run the engine built
  (:meth:`mcbeit.engine.trainer.Trainer.ready`) for :class:`~mcbeit.tasks.detection.DetectionTask` from
  :class:`~mcbeit.config.detection.DetectionConfig`, the default preset (``benchmarking_mask_rcnn_base_FPN_25ep_LSJ_
  mc-beit``: ViT-B, input 1024, 16 x 16 windows with blocks 2, 5, 8, 11 global, drop path 0.1, AdamW with
  detectron2's decay rule, plain BatchNorm in one process), random initialisation, the engine's precision for the
  device (fp32 on a CPU, bf16 on a GPU that has it). The task reads its number of classes from the annotations, so
  the run points ``--data_path`` at a stub COCO root whose json lists 80 categories (one 32 x 32 image with one box;
  nothing of it reaches the step).
- the batch: made once; per image random pixels in 0-1 (3,S,S) and three instances: an ellipse mask (uint8 (S,S))
  in a random box of 1/8 to 1/2 of the side, the box its tight extent (as the data pipeline's boxes from masks),
  a random label in 1..80. Batch 1 on a CPU, 2 on a GPU (the recipe's 2 images per GPU).
- with and without ``--grad_checkpointing`` (the original's ``with_cp``: the backbone's blocks recomputed in the
  backward): two runs built alike (the same seed: the same weights), timed alternately step by step after the
  warm-up, then the peak step memory and FLOPs of each (recomputation counted); the ratios are checkpointing's over
  the plain step's.

The evaluation: the detector of the same run in eval mode on one 1024 x 1024 input holding a 1024 x 768 (w x h, COCO's
4:3) image, made by the test transform (:class:`~mcbeit.data.det_transforms.ResizePadTestTransform`: scale 1, padded
below), through what :func:`mcbeit.evaluation.detection.evaluate_detection` does per image: the forward under the
run's autocast with ``torch.no_grad()`` asking for the mask head's box-level masks (``transform.paste_masks = False``),
then :func:`~mcbeit.evaluation.detection.to_coco_results` (boxes mapped back and clipped, the 28 x 28 masks pasted at
the original size, RLE-encoded). Phases ``forward`` and ``results``. With random weights no class score reaches the
recipe's threshold of 0.05 (the 81-way softmax sits near 1/81), so the image would yield no detection and skip the
mask head and the pasting: the benchmark sets the threshold to 0, so the image carries the recipe's cap of 100
detections (what a trained COCO model outputs for most images) through both; its per-class NMS then sees all 80
classes' boxes (more than a trained model passes at 0.05: an upper bound on that part).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mcbeit.bench.measure import PhaseTimer, count_flops, peak_memory
from mcbeit.bench.segmentation import SHORT, SIZES
from mcbeit.bench.step import Formulation, side_by_side, step
from mcbeit.config import resolve

NUM_CLASSES = 80
INSTANCES = 3                       # per training image
EVAL_IMAGE = (768, 1024)            # (h, w): COCO's 4:3 at the input's long side
#: the quick configuration's model: the embedded demonstration's small pyramid and heads (DetModel.EMBEDDED)
QUICK_FLAGS: dict[str, Any] = {"window_size": 4, "fpn_channels": 64, "box_fc_dim": 256,
                               "anchor_sizes": (16, 32, 64, 128, 256), "box_batch_size_per_image": 128}
_WHO = (("plain", "no"), ("checkpointing", "yes"))


def _coco_stub(root: Path) -> Path:
    """A COCO root (train2017/, val2017/, annotations/instances_{train,val}2017.json) holding one 32 x 32 image with
    one box in both splits, and 80 categories: enough for the task to build its datasets and so its model."""
    categories = [{"id": i, "name": f"class{i}", "supercategory": "stub"} for i in range(1, NUM_CLASSES + 1)]
    coco = {"images": [{"id": 1, "file_name": "stub.jpg", "height": 32, "width": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256,
                             "iscrowd": 0, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]]}],
            "categories": categories}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / f"{split}2017" / "stub.jpg")
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def build_run(size: str = "base", input_size: int = 1024, amp: str | None = None, device: str = "cpu",
              grad_checkpointing: bool = False, batch_size: int = 1, flags: dict[str, Any] | None = None):
    """The product's detection run (model, optimizer, strategy), built by the engine as ``mcbeit-det train`` builds
    it from the default preset; ``amp`` None: the engine's default for the device; ``flags``: further
    :class:`~mcbeit.config.detection.DetectionConfig` values (the quick configuration's small heads)."""
    from mcbeit.config.detection import DetectionConfig
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.detection import DetectionTask

    values = {"model": SIZES[size], "image_size": input_size, "pretrained": "none", "output_dir": "",
              "device": device, "grad_checkpointing": grad_checkpointing, "batch_size": batch_size,
              "total_batch_size": batch_size, **(flags or {})}
    if amp is not None:
        values["amp"] = "off" if amp == "fp32" else amp
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve(DetectionConfig, {"data_path": str(_coco_stub(Path(tmp))), **values})
        return Trainer(config, DetectionTask(config)).ready(steps_per_epoch=10 ** 6)


def amp_name(run) -> str:
    """fp32 / bf16 / fp16: the run's training precision."""
    return "fp32" if run.precision.dtype is None else run.precision.name


def make_batch(batch_size: int, input_size: int, device: torch.device, seed: int = 0):
    """(images, targets) as ``det_collate`` gives them: B images (3,S,S) in 0-1 and target dicts with
    ``INSTANCES`` ellipse masks (uint8 (N,S,S)), their tight boxes (N,4) xyxy and labels in 1..80."""
    g = torch.Generator().manual_seed(seed)
    s = input_size
    ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")  # pixel centres (S,S)
    images, targets = [], []
    for i in range(batch_size):
        images.append(torch.rand(3, s, s, generator=g).to(device))
        masks = torch.zeros(INSTANCES, s, s, dtype=torch.uint8)
        for k in range(INSTANCES):
            w, h = (torch.randint(s // 8, s // 2 + 1, (2,), generator=g)).tolist()
            x0, y0 = torch.randint(0, s - w + 1, (1,), generator=g).item(), torch.randint(0, s - h + 1, (1,),
                                                                                          generator=g).item()
            inside = ((xs - x0 - w / 2) / (w / 2)) ** 2 + ((ys - y0 - h / 2) / (h / 2)) ** 2 <= 1
            masks[k] = inside.to(torch.uint8)
        rows, cols = masks.any(2), masks.any(1)                        # (N,S) each
        boxes = torch.stack([cols.float().argmax(1), rows.float().argmax(1),
                             s - cols.flip(1).float().argmax(1), s - rows.flip(1).float().argmax(1)], 1).float()
        targets.append({"boxes": boxes.to(device), "masks": masks.to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (INSTANCES,), generator=g).to(device),
                        "iscrowd": torch.zeros(INSTANCES, dtype=torch.uint8, device=device),
                        "image_id": i + 1, "orig_size": (s, s), "scale": 1.0})
    return images, targets


def run_detection_step(size: str = "base", batch_size: int = 1, input_size: int = 1024, amp: str | None = None,
                       steps: int = 1, warmup: int = 1, device: str = "cpu", memory: bool = True, flops: bool = True,
                       flags: dict[str, Any] | None = None) -> dict:
    """Median seconds per phase and per step, images/s, peak step memory and FLOPs of the detection step without
    (``plain``) and with (``checkpointing``) activation checkpointing, on the same batch (alternating)."""
    runs = {who: build_run(size, input_size, amp, device, who == "checkpointing", batch_size, flags)
            for who, _ in _WHO}
    plain, ckpt = runs["plain"], runs["checkpointing"]
    batch = make_batch(batch_size, input_size, plain.device)
    for run in runs.values():
        run.task.model.train()
    precision = amp_name(plain)
    row = {"config": f"mask-rcnn {SHORT[size]}@{input_size} b{batch_size} {precision}", "model": SIZES[size],
           "batch_size": batch_size, "input_size": input_size, "amp": precision, "device": str(plain.device),
           "steps": steps, "num_classes": plain.task.num_classes, "instances_per_image": INSTANCES,
           "parameters_m": sum(p.numel() for p in plain.task.model.parameters()) / 1e6,
           "grad_checkpointing": {who: bool(run.task.model.backbone.body.grad_checkpointing)
                                  for who, run in runs.items()}}

    def formulation(run) -> Formulation:
        optimizer = run.strategy.optimizer
        return Formulation(lambda mark=None: step(run, batch, mark), lambda: optimizer.zero_grad(set_to_none=True))

    figures = side_by_side(formulation(plain), formulation(ckpt), plain.device, batch_size, warmup, steps, memory,
                           flops)
    row["plain"], row["checkpointing"] = figures["ours"], figures["reference"]
    for f in (row["plain"], row["checkpointing"]):
        for phase in ("tokenizer", "loss"):                 # not phases of this step (the forward holds the losses)
            f.pop(f"{phase}_s", None)
    row["time_ratio"] = row["checkpointing"]["step_s"] / row["plain"]["step_s"]
    if memory and row["plain"]["peak_bytes"]:
        row["memory_ratio"] = row["checkpointing"]["peak_bytes"] / row["plain"]["peak_bytes"]
    return row


def eval_input(input_size: int, image_size: tuple[int, int], seed: int = 0):
    """One test input (3,S,S) and its target (``image_id``, ``orig_size``, ``scale``) from a random (h, w) image,
    as the test dataset makes them."""
    from mcbeit.data.det_transforms import ResizePadTestTransform

    h, w = image_size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image, target = ResizePadTestTransform(input_size)(Image.fromarray(pixels))
    return image, {**target, "image_id": 1, "orig_size": (h, w)}


def run_detection_eval(size: str = "base", input_size: int = 1024, image_size: tuple[int, int] = EVAL_IMAGE,
                       amp: str | None = None, repeats: int = 1, warmup: int = 1, device: str = "cpu",
                       memory: bool = True, flops: bool = True, flags: dict[str, Any] | None = None) -> dict:
    """Seconds per phase (median over ``repeats``, after ``warmup``), peak memory and FLOPs of evaluating one
    ``image_size`` (h, w) image: the detector's forward with box-level masks and ``to_coco_results``."""
    from mcbeit.evaluation.detection import to_coco_results

    run = build_run(size, input_size, amp, device, flags=flags)
    model, dev = run.task.model.eval(), run.device
    model.roi_heads.score_thresh = 0.0                # random weights: see the module docstring
    model.transform.paste_masks = False               # the box-level masks, pasted at the original size
    image, target = eval_input(input_size, image_size)
    image = image.to(dev)
    categories = run.task.categories
    found: dict[str, Any] = {}

    def once(mark=None):
        mark = mark or (lambda phase: None)
        with torch.no_grad(), run.precision.autocast():
            outputs = model([image])
        mark("forward")
        results = to_coco_results([{**out, "mask_kind": "roi"} for out in outputs], [target], categories)
        mark("results")
        found["results"] = results
        return results

    timer = PhaseTimer(dev)
    for i in range(warmup + repeats):
        timer.start()
        once(timer.mark)
        timer.stop(i >= warmup)
    medians = timer.medians()
    h, w = image_size
    precision = amp_name(run)
    results = found["results"]
    row = {"config": f"mask-rcnn eval {SHORT[size]}@{input_size} {w}x{h} {precision}", "model": SIZES[size],
           "image": [h, w], "input_size": input_size, "scale": target["scale"], "amp": precision, "device": str(dev),
           "repeats": repeats, "score_thresh": 0.0, "detections": len(results),
           "with_masks": sum("segmentation" in r for r in results),
           "mask_size": results[0]["segmentation"]["size"] if results and "segmentation" in results[0] else None,
           "forward_s": medians["forward"], "results_s": medians["results"], "s_per_image": medians["step"],
           "images_per_s": 1.0 / medians["step"]}
    if memory:
        row["peak_bytes"] = peak_memory(once, dev)
    if flops:
        row["gflop_per_image"] = count_flops(once) / 1e9
    return row


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.0f}"


def print_detection_step(row: dict, header: bool = True) -> None:
    """The step's table: one line without and one with checkpointing, then the ratios."""
    if header:
        print(f"{'config':<26}{'ckpt':>5}{'forward':>9}{'backward':>10}{'optim':>8}{'step':>9}{'img/s':>8}"
              f"{'peak MB':>9}{'GFLOP':>8}{'GFLOP/s':>9}")
    for who, label in _WHO:
        f = row[who]
        gflop = f.get("gflop")
        print(f"{row['config'] if who == 'plain' else '':<26}{label:>5}{f['forward_s']:>9.3f}{f['backward_s']:>10.3f}"
              f"{f['optimizer_s']:>8.3f}{f['step_s']:>9.3f}{f['images_per_s']:>8.3f}{_mb(f.get('peak_bytes')):>9}"
              f"{'-' if gflop is None else f'{gflop:.0f}':>8}"
              f"{'-' if gflop is None else format(f['gflop_per_s'], '.1f'):>9}")
    memory = f", {row['memory_ratio']:.2f}x the peak memory" if "memory_ratio" in row else ""
    print(f"{'':<26}  -> checkpointing: {row['time_ratio']:.2f}x the step time{memory}", flush=True)


def print_detection_eval(row: dict) -> None:
    peak = "" if "peak_bytes" not in row else f", peak {_mb(row['peak_bytes'])} MB"
    gflop = "" if "gflop_per_image" not in row else f", {row['gflop_per_image']:.0f} GFLOP"
    h, w = row["image"]
    print(f"\nDetection evaluation, {row['config']} ({w}x{h} image in a {row['input_size']} input, "
          f"{row['detections']} detections with masks pasted at {w}x{h}), median seconds per image")
    print(f"  forward {row['forward_s']:.3f} s + results {row['results_s']:.3f} s = {row['s_per_image']:.3f} s "
          f"({row['images_per_s']:.2f} images/s){peak}{gflop}", flush=True)
