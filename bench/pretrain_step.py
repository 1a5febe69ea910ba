"""Time one mc-BEiT pre-training step (tokenizer + forward + loss + backward + optimizer) by phase.

    python -m bench.pretrain_step --model beit_tiny_patch16_224_8k_vocab --batch_size 8
    python -m bench.pretrain_step --model beit_base_patch16_224_8k_vocab --tokenizer dall-e --steps 3

Runs the product's own step (`mcbeit.engine.loop.pretrain_step`) on random inputs with block
masks, after warm-up steps, and prints the median time per phase and per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import timm
import torch

import mcbeit.models  # noqa: F401
from mcbeit.data.masking import BlockMaskGenerator
from mcbeit.engine.distributed import DistInfo
from mcbeit.engine.loop import PretrainState, autocast_context, pretrain_step
from mcbeit.engine.optim import build_optimizer
from mcbeit.objectives import build_objective
from mcbeit.tokenizers import build_tokenizer


def _batch(batch_size: int, input_size: int, second: int, window: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = BlockMaskGenerator((window, window), int(0.38 * window * window), min_num_patches=min(16, window * window // 4))
    mask = torch.from_numpy(np.stack([masks(rng).reshape(-1) for _ in range(batch_size)]))
    return torch.randn(batch_size, 3, input_size, input_size), torch.rand(batch_size, 3, second, second) * 2 - 1, mask


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="beit_tiny_patch16_224_8k_vocab")
    p.add_argument("--tokenizer", default="customized", help="tokenizer kind (random weights)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cpu")
    second = args.input_size // 2
    tokenizer = build_tokenizer(args.tokenizer, None, second)
    model = timm.create_model(args.model, img_size=args.input_size, vocab_size=tokenizer.vocab_size,
                              use_shared_rel_pos_bias=True, init_values=0.1)
    optimizer = build_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    total = args.warmup + args.steps
    state = PretrainState(model=model, model_without_ddp=model, tokenizer=tokenizer, objective=build_objective(False),
                          optimizer=optimizer, scaler=None, lr_schedule=np.full(total, 1e-4),
                          wd_schedule=np.full(total, 0.05), dist=DistInfo(device=device), amp_dtype=amp,
                          params=[q for q in model.parameters() if q.requires_grad])
    window = args.input_size // 16
    view_a, view_b, mask = _batch(args.batch_size, args.input_size, second, window)

    step_times, tok_times = [], []
    for i in range(total):
        t0 = time.perf_counter()
        with torch.no_grad(), autocast_context(device, amp):
            tokenizer(view_b)
        t1 = time.perf_counter()
        pretrain_step(state, (view_a, view_b, mask), temp=4.0)
        t2 = time.perf_counter()
        if i >= args.warmup:
            tok_times.append(t1 - t0)
            step_times.append(t2 - t1)
    step = statistics.median(step_times)
    tok = statistics.median(tok_times)
    result = {"model": args.model, "tokenizer": args.tokenizer, "batch_size": args.batch_size,
              "input_size": args.input_size, "amp": args.amp, "threads": torch.get_num_threads(),
              "step_s": step, "tokenizer_s": tok, "images_per_s": args.batch_size / step}
    print(f"{args.model} + {args.tokenizer} tokenizer, batch {args.batch_size} at {args.input_size}px, "
          f"amp {args.amp}, {torch.get_num_threads()} threads: step {step:.3f} s "
          f"(tokenizer {tok:.3f} s of it), {args.batch_size / step:.1f} images/s")
    return result


if __name__ == "__main__":
    main()
