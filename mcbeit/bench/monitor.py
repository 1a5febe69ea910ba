"""What the k-NN monitor of pre-training costs (issue 15): one measurement's feature extraction per
1,000 images, and its classifiers (k-NN, linear probe) on 1,000 train and 1,000 val images.

Extraction is timed on ``images`` in-memory images (decoding is the data section's business) after a
warm-up batch and scaled to 1,000; the classifiers run on random features of the model's width, as
many as the monitor fits (the last block's and one inner block's CLS and mean patch token).
"""
from __future__ import annotations

import time

import timm
import torch

from mcbeit.bench.step import amp_dtype_of
from mcbeit.evaluation.knn import extract, feature_keys, knn_accuracy, linear_probe_accuracy
from mcbeit.evaluation.monitor import default_block


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_monitor(device: str, quick: bool = False, amp: str = "fp32") -> dict:
    dev = torch.device(device)
    name, size = ("beit_tiny_patch16_224", 64) if quick else ("beit_base_patch16_224", 224)
    images = 8 if quick else (1024 if dev.type == "cuda" else 64)
    batch = 4 if quick else (256 if dev.type == "cuda" else 32)
    model = timm.create_model(name, pretrained=False, img_size=size).to(dev).eval()
    block = default_block(len(model.blocks))
    x = torch.randn(images, 3, size, size)
    loader = [(x[i:i + batch], torch.zeros(min(batch, images - i), dtype=torch.long)) for i in range(0, images, batch)]
    dtype = amp_dtype_of(amp)
    extract(model, loader[:1], dev, block=block, amp_dtype=dtype)             # warm-up
    _sync(dev)
    start = time.perf_counter()
    extract(model, loader, dev, block=block, amp_dtype=dtype)
    _sync(dev)
    extract_s = (time.perf_counter() - start) / images * 1000
    n, classes, dim = (64, 4, model.num_features) if quick else (1000, 100, model.num_features)
    gen = torch.Generator().manual_seed(0)
    keys = feature_keys(model, block)
    train, val = torch.randn(n, dim, generator=gen).to(dev), torch.randn(n, dim, generator=gen).to(dev)
    labels = (torch.arange(n) % classes).to(dev)
    start = time.perf_counter()
    for _ in keys:
        knn_accuracy(train, labels, val, labels, classes)
    _sync(dev)
    knn_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in keys:
        linear_probe_accuracy(train, labels, val, labels, classes)
    _sync(dev)
    linear_s = time.perf_counter() - start
    row = {"model": name, "input_size": size, "amp": amp, "device": device, "timed_images": images,
           "extract_s_per_1000": extract_s, "classifiers_images": n, "features": len(keys), "knn_s": knn_s,
           "linear_s": linear_s}
    print(f"\nk-NN monitor, {name} at {size} px ({amp}, {device}): extraction {extract_s:.1f} s per 1,000 images "
          f"(timed on {images}); k-NN {knn_s:.2f} s and linear probe {linear_s:.2f} s for {len(keys)} features of "
          f"{n} train / {n} val images")
    return row
