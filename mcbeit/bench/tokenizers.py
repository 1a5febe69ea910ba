"""Cost of each tokenizer per image, as pre-training runs it (inference mode, optional bf16).

    python -m mcbeit.bench.tokenizers                      # every kind, 112 px, batch 8, fp32 and bf16
    python -m mcbeit.bench.tokenizers --kinds customized --batch_size 32

Prints GFLOPs per image (torch's FlopCounterMode, FLOPs = 2 x MACs) and the median seconds per
image over a few timed calls after a warm-up call; `--json PATH` writes the same figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcbeit.engine.precision import autocast_context
from mcbeit.tokenizers import TOKENIZER_KINDS, build_tokenizer


def measure(kind: str, batch_size: int, image_size: int, amp: torch.dtype | None, repeats: int) -> dict:
    tokenizer = build_tokenizer(kind, None, image_size)
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1
    device = torch.device("cpu")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        tokenizer(images[:1])
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.inference_mode(), autocast_context(device, amp):
            tokenizer(images)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    per_image = statistics.median(times) / batch_size
    return {"kind": kind, "image_size": image_size, "batch_size": batch_size,
            "amp": "bf16" if amp is not None else "fp32", "gflops_per_image": counter.get_total_flops() / 1e9,
            "seconds_per_image": per_image, "images_per_s": 1.0 / per_image}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(TOKENIZER_KINDS))
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logger = logging.getLogger("mcbeit")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the random-weights warning, once per kind
    try:
        rows = _measure_all(args)
    finally:
        logger.setLevel(level)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def _measure_all(args) -> list[dict]:
    rows = []
    print(f"{'tokenizer':<12} {'amp':<5} {'GFLOPs/img':>10} {'ms/img':>9} {'img/s':>8}   ({torch.get_num_threads()} threads)")
    for kind in args.kinds:
        for amp in args.amp:
            row = measure(kind, args.batch_size, args.image_size, torch.bfloat16 if amp == "bf16" else None, args.repeats)
            rows.append(row)
            print(f"{kind:<12} {row['amp']:<5} {row['gflops_per_image']:>10.2f} {1e3 * row['seconds_per_image']:>9.1f} "
                  f"{row['images_per_s']:>8.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
