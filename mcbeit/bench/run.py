"""``python -m mcbeit.bench`` / ``mcbeit-bench``: what a pre-training step, the data pipeline and a
fine-tuning step cost, ours against the reference formulation, measured side by side in one run.

    python -m mcbeit.bench                       # the full table on this machine (2-core CPU: about 7 minutes)
    python -m mcbeit.bench --quick               # seconds: tiny models and images (CI runs this)
    python -m mcbeit.bench --json figures.json   # also write every figure
    python -m mcbeit.bench --sections segmentation   # UperNet ViT-B@512 against transformers' (about 12 minutes)
    python -m mcbeit.bench --sections detection      # Mask R-CNN ViT-B@1024, checkpointing on and off (about 7 minutes)

Speed-ups are the reference's time over ours and memory ratios ours over the reference's, both
measured in the same process on the same inputs. On a GPU (``--device cuda``) the step table adds
batch 64 and the model FLOPs utilisation against the GPU's peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mcbeit.bench.step import StepConfig, amp_dtype_of, run_finetune_step, run_step
from mcbeit.engine.precision import native_low_precision
from mcbeit.models.recompute import DEFAULT_RECOMPUTE, RECOMPUTE_MODES

BASE, TINY = "beit_base_patch16_224_8k_vocab", "beit_tiny_patch16_224_8k_vocab"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.0f}"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _step_configs(args) -> list[StepConfig]:
    device = args.device
    if args.quick:
        return [StepConfig(model=TINY, tokenizer="customized", batch_size=2, input_size=64, steps=1, warmup=0,
                           device=device)]
    amps = args.amps.split(",")
    models = {"tiny": TINY, "base": BASE}
    out = []
    for m in args.models.split(","):
        for amp in amps:
            native = amp == "fp32" or native_low_precision(torch.device(device), amp_dtype_of(amp))
            if not native and m == "base" and not args.emulated:
                print(f"(base {amp} skipped: this CPU emulates {amp} (no AVX-512-BF16 / AMX), one step takes "
                      f"minutes and says nothing about {amp} hardware; --emulated times it anyway)")
                continue
            out.append(StepConfig(model=models[m], amp=amp, device=device, recompute=args.recompute,
                                  steps=args.steps if native else 1, memory=native, flops=native))
    if device == "cuda":
        out += [StepConfig(model=BASE, amp=amp, batch_size=64, device=device, steps=args.steps)
                for amp in ("bf16", "fp32")]
    return out


def _save(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")


# (column title, phase, width) of the step tables
STEP_COLUMNS = (("tokenizer", "tokenizer", 10), ("forward", "forward", 9), ("loss", "loss", 8),
                ("backward", "backward", 10), ("optim", "optimizer", 8))
CONMIM_COLUMNS = (("teacher", "teacher", 10), ("forward", "forward", 9), ("loss", "loss", 8),
                  ("backward", "backward", 10), ("optim", "optimizer", 8), ("ema", "ema", 7))
SEG_COLUMNS = (("fwd+loss+bwd", "fwd_loss_bwd", 14), ("optim", "optimizer", 8))


def print_step_table(rows: list[dict], header: bool = True, columns=STEP_COLUMNS,
                     title: str | None = "Pre-training step (tokenizer + forward + loss + backward + AdamW)") -> None:
    if header and title:
        print(f"\n{title}, median seconds per step")
    head = f"{'config':<22}{'':>4}" + "".join(f"{name:>{width}}" for name, _, width in columns) + \
           f"{'step':>8}{'img/s':>8}{'peak MB':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'MFU':>6}"
    if header:
        print(head)
    for row in rows:
        for who in ("ours", "reference"):
            if who not in row:
                continue
            f = row[who]
            phases = "".join(f"{f.get(f'{phase}_s', 0.0):>{width}.3f}" for _, phase, width in columns)
            print(f"{row['config'] if who == 'ours' else '':<22}{who[:4]:>4}{phases}{f['step_s']:>8.3f}"
                  f"{f['images_per_s']:>8.2f}{_mb(f.get('peak_bytes')):>9}{_num(f.get('gflop'), '.0f'):>8}"
                  f"{_num(f.get('gflop_per_s'), '.1f'):>9}{_num(f.get('mfu'), '.0%'):>6}")
        if "speedup" in row:
            memory = f", memory {row['memory_ratio']:.2f}x" if "memory_ratio" in row else ""
            diff = "" if row.get("loss_abs_diff") is None else f", |loss - literal loss| = {row['loss_abs_diff']:.1e}"
            print(f"{'':<22}  -> speed-up {row['speedup']:.2f}x{memory}{diff}", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcbeit-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models and images: checks that everything runs")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--models", default="tiny,base", help="step configurations: comma-separated tiny, base")
    p.add_argument("--amps", default="fp32,bf16", help="step configurations: comma-separated fp32, bf16 (fp16 on CUDA)")
    p.add_argument("--emulated", action="store_true",
                   help="also time base in bf16 / fp16 on a CPU that only emulates them (minutes per step)")
    p.add_argument("--recompute", default=DEFAULT_RECOMPUTE, choices=RECOMPUTE_MODES,
                   help="the product's --recompute in the step configurations (the reference keeps everything)")
    p.add_argument("--sections", default="step,data,finetune,tokenizers,scaling,monitor,beitv2,conmim",
                   help="comma-separated subset of: step, data, finetune, tokenizers, scaling, monitor, beitv2, conmim, "
                        "segmentation, detection, compile (not in the default: segmentation times ViT-B UperNet at 512 beside "
                        "transformers', about 12 minutes on a 2-core CPU; detection times a ViT-B Mask R-CNN step at 1024 with "
                        "and without activation checkpointing and the evaluation of one image, one timed step on a CPU, about "
                        "7 minutes on a 2-core CPU; inductor compiles for minutes on a CPU)")
    p.add_argument("--work_dir", default=None, help="where the generated JPEGs go (default: a temporary folder)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators of one base fp32 step, ours and the reference")
    return p


def _section_step(args, result: dict) -> None:
    rows = []
    for cfg in _step_configs(args):
        rows.append(run_step(cfg))
        print_step_table(rows[-1:], header=len(rows) == 1)
        _save(args.json, {**result, "step": rows})   # a long run keeps what it measured
    result["step"] = rows
    key = next((r for r in rows if r["model"] == (TINY if args.quick else BASE) and r["amp"] == "fp32"
                and r["batch_size"] == (2 if args.quick else 8)), None)
    if key is not None:
        result["speedup_step_base_fp32"] = key["speedup"]
        result["memory_ratio_step_base_fp32"] = key.get("memory_ratio")


def _section_data(args, result: dict) -> None:
    from mcbeit.bench.data import run_data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work_dir or tmp) / "bench_jpegs"
        if args.quick:
            rows = [run_data(folder / "q", count=4, size=(128, 96), input_size=64, repeats=1)]
        else:
            rows = [run_data(folder / "imagenet", count=64, size=(500, 375)),
                    run_data(folder / "large", count=32, size=(1024, 768))]
    print("\nData pipeline per worker (decode + two views + mask), median ms per image")
    for row in rows:
        print(f"{row['config']:<34} ours {row['ours']['ms_per_image']:6.2f} ms ({row['ours']['images_per_s']:5.0f}/s)"
              f"   reference {row['reference']['ms_per_image']:6.2f} ms   -> speed-up {row['speedup']:.2f}x")
    result["data"] = rows
    result["speedup_data_per_worker"] = rows[0]["speedup"]


def _section_finetune(args, result: dict) -> None:
    if args.quick:
        row = run_finetune_step("beit_tiny_patch16_224", batch_size=2, input_size=64, steps=1, warmup=0,
                                device=args.device)
    else:
        row = run_finetune_step("beit_base_patch16_224", steps=args.steps, device=args.device)
    print(f"\nFine-tuning step: {row['config']}: ours {row['ours']['step_s']:.3f} s, reference "
          f"{row['reference']['step_s']:.3f} s -> speed-up {row['speedup']:.2f}x")
    result["finetune"] = row


def _section_tokenizers(args, result: dict) -> None:
    from mcbeit.bench import tokenizers

    print("\nTokenizers, cost per image as pre-training runs them")
    tok_argv = (["--kinds", "customized", "--image_size", "32", "--batch_size", "2", "--repeats", "1",
                 "--amp", "fp32"] if args.quick else ["--amp", "fp32", "--repeats", "1"])
    result["tokenizers"] = tokenizers.main(tok_argv)


def _section_scaling(args, result: dict) -> None:
    from mcbeit.bench.scaling import run_scaling

    result["scaling"] = run_scaling(args.device, quick=args.quick)


def _section_monitor(args, result: dict) -> None:
    from mcbeit.bench.monitor import run_monitor

    amps = ["fp32"] + (["bf16"] if args.device == "cuda" else [])
    result["monitor"] = [run_monitor(args.device, quick=args.quick, amp=amp) for amp in amps]


def _section_beitv2(args, result: dict) -> None:
    from mcbeit.bench.beitv2 import run_beitv2_step, run_vqkd_step

    if args.quick:
        configs = [dict(size="tiny", batch_size=2, input_size=64, steps=1, warmup=0)]
    else:
        configs = [dict(size=m, steps=args.steps) for m in args.models.split(",")]
    for key, title, job in (
            ("beitv2", "BEiT v2 pre-training step (VQ-KD ids + forward + CE + CE + backward + AdamW)", run_beitv2_step),
            ("vqkd", "VQ-KD training step (teacher in the tokenizer column; encoder + quantiser + decoder + cosine loss "
                     "in forward)", run_vqkd_step)):
        print(f"\n{title}, median seconds per step")
        rows = []
        for cfg in configs:
            rows.append(job(device=args.device, **cfg))
            print_step_table(rows[-1:], header=False)
            _save(args.json, {**result, key: rows})
        result[key] = rows


def _section_conmim(args, result: dict) -> None:
    from mcbeit.bench.conmim import run_conmim_step

    if args.quick:
        configs = [dict(size="tiny", batch_size=2, input_size=64, steps=1, warmup=0)]
    else:
        configs = [dict(size=m, steps=args.steps) for m in args.models.split(",")]
    print("\nConMIM pre-training step (EMA teacher + student + projectors + patch contrast + backward + AdamW + "
          "EMA update), median seconds per step")
    rows = []
    for cfg in configs:
        rows.append(run_conmim_step(device=args.device, **cfg))
        print_step_table(rows[-1:], header=len(rows) == 1, columns=CONMIM_COLUMNS, title=None)
        _save(args.json, {**result, "conmim": rows})
    result["conmim"] = rows


def _section_segmentation(args, result: dict) -> None:
    from mcbeit.bench.segmentation import print_slide, run_segmentation_step, run_slide_eval

    amps = ["fp32"] + (["bf16"] if args.device == "cuda" else [])
    if args.quick:
        step_cfg = dict(size="tiny", input_size=64, steps=1, warmup=0)
        slide_cfg = dict(size="tiny", input_size=64, image_size=(64, 85), repeats=1, warmup=0)
    else:
        step_cfg, slide_cfg = dict(size="base"), dict(size="base")
    print("\nUperNet segmentation step (forward + decode and auxiliary losses + backward + AdamW) beside transformers' "
          "BeitForSemanticSegmentation of the same size (a speed reference: it feeds blocks 1,3,5,9 to the neck), "
          "median seconds per step")
    rows = []
    for amp in amps:
        rows.append(run_segmentation_step(device=args.device, amp=amp, **step_cfg))
        print_step_table(rows[-1:], header=len(rows) == 1, columns=SEG_COLUMNS, title=None)
        _save(args.json, {**result, "segmentation": rows})
    slides = [run_slide_eval(device=args.device, amp=amp, **slide_cfg) for amp in amps]
    for row in slides:
        print_slide(row)
    result["segmentation"] = rows
    result["segmentation_slide"] = slides


def _section_detection(args, result: dict) -> None:
    from mcbeit.bench.detection import (QUICK_FLAGS, print_detection_eval, print_detection_step, run_detection_eval,
                                        run_detection_step)

    batch_size = 2 if args.device == "cuda" else 1         # the recipe's 2 images per GPU; 1 on a CPU
    if args.quick:
        step_cfg = dict(size="tiny", input_size=128, steps=1, warmup=0, flags=QUICK_FLAGS)
        eval_cfg = dict(size="tiny", input_size=128, image_size=(96, 128), repeats=1, warmup=0, flags=QUICK_FLAGS)
    else:
        repeats = args.steps if args.device == "cuda" else 1   # ViT-B at 1024: about 45 s per CPU step (2 cores)
        step_cfg, eval_cfg = dict(size="base", steps=repeats), dict(size="base", repeats=repeats)
    print("\nMask R-CNN detection step (forward with the RPN and RoI-head losses + backward + AdamW), without and with "
          "activation checkpointing of the backbone's blocks, median seconds per step")
    rows = [run_detection_step(device=args.device, batch_size=batch_size, **step_cfg)]
    print_detection_step(rows[-1])
    _save(args.json, {**result, "detection": rows})
    evals = [run_detection_eval(device=args.device, **eval_cfg)]
    for row in evals:
        print_detection_eval(row)
    result["detection"] = rows
    result["detection_eval"] = evals


def _section_compile(args, result: dict) -> None:
    from mcbeit.bench.step import run_compile

    cfg = _step_configs(args)[0] if args.quick else StepConfig(model=TINY, device=args.device, steps=args.steps)
    row = run_compile(cfg, backend="eager" if args.quick else "inductor")
    print(f"\n--compile ({row['backend']}), {row['config']}: first step {row['compiled_first_s']:.1f} s "
          f"(compiling), then {row['compiled_step_s']:.3f} s per step against {row['eager_step_s']:.3f} s eager "
          f"-> {row['speedup']:.2f}x")
    result["compile"] = row


SECTIONS = {"step": _section_step, "data": _section_data, "finetune": _section_finetune,
            "tokenizers": _section_tokenizers, "scaling": _section_scaling, "monitor": _section_monitor, "beitv2": _section_beitv2,
            "conmim": _section_conmim, "segmentation": _section_segmentation, "detection": _section_detection,
            "compile": _section_compile}


def main(argv=None) -> dict:
    p = get_args_parser()
    args = p.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown --sections {sorted(unknown)}")

    started = time.perf_counter()
    result: dict = {"mode": "quick" if args.quick else "full", "device": args.device,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(f"mcbeit-bench ({result['mode']}): {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, section in SECTIONS.items():  # in this order
        if name in sections:
            section(args, result)
    if args.profile:
        from mcbeit.bench.step import profile_step

        cfg = _step_configs(args)[0] if args.quick else StepConfig(model=BASE, device=args.device, steps=1)
        result["profile"] = profile_step(cfg)

    result["seconds"] = time.perf_counter() - started
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        _save(args.json, result)
        print(f"figures written to {args.json}")
    return result


def console() -> int:
    """``mcbeit-bench``."""
    return 0 if main() else 1


if __name__ == "__main__":
    sys.exit(console())
