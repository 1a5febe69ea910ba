"""`mcbeit-export`: a fine-tuned or pre-trained checkpoint as timm safetensors (+ Hugging Face transformers BEiT).

    mcbeit-export output/finetune/checkpoint-best.pth --output exported/ --hf

writes ``exported/model.safetensors`` + ``exported/config.json`` (timm's hub layout: load with
``timm.create_model('local-dir:exported', pretrained=True)``) and, with ``--hf``, ``exported/hf/``
for ``transformers.BeitForImageClassification`` (fine-tuned) or ``BeitModel`` (pre-trained backbone).
The class names a fine-tuning checkpoint holds become ``label_names`` in ``config.json`` and
``id2label`` in ``hf/config.json``. The written files are loaded back and compared with the
checkpoint's model before the command reports success. Conversion logic: :mod:`mcbeit.models.export`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from mcbeit.errors import InputError

log = logging.getLogger("mcbeit.export")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "mcbeit-export",
        description="Write a BEiT checkpoint (mcbeit-finetune, mcbeit-pretrain or a released BEiT .pth) as "
                    "timm safetensors + config.json, and optionally as Hugging Face transformers BEiT. The "
                    "architecture (classes, pooling, position biases, layer scale, grid) is read from the weights.")
    p.add_argument("checkpoint", help="the .pth file to export")
    p.add_argument("--output", required=True, help="folder to write (model.safetensors, config.json, hf/)")
    p.add_argument("--use_ema", action="store_true", help="export the checkpoint's model_ema weights")
    p.add_argument("--hf", action="store_true", help="also write <output>/hf/ for transformers' BeitModel / "
                   "BeitForImageClassification (needs transformers: pip install 'mcbeit[hf]')")
    p.add_argument("--model", default=None,
                   help="timm name, e.g. beit_base_patch16_224 (a pre-training name ending in _8k_vocab is taken as its "
                        "classifier); default: the checkpoint's args.model (needed for released files without args)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size; default: the grid the weights hold, else args.input_size, else 224")
    p.add_argument("--imagenet_default_mean_and_std", action="store_true", default=None,
                   help="record ImageNet mean/std in the preprocessing (default: the checkpoint's flag; 0.5/0.5 without it)")
    p.add_argument("--crop_pct", type=float, default=None,
                   help="evaluation crop fraction to record; default: args.crop_pct, else 224/256 below 384 px, else 1.0")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--no_verify", action="store_false", dest="verify",
                   help="skip loading the written files back and comparing outputs (1e-4)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Export as ``args`` say; return {'output': folder, 'calls': [timm calls], 'diffs': {route: max |diff|}}."""
    from timm.models import model_entrypoint

    from mcbeit.models.export import (ExportError, hf_config_kwargs, load_for_export, save_hf, save_timm,
                                      timm_create_calls, verify_export)

    out = Path(args.output)
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise ExportError(f"{out} already holds an export: pass --overwrite to replace it, or another --output")
    overrides = {k: getattr(args, k) for k in ("model", "input_size", "imagenet_default_mean_and_std", "crop_pct")}
    exp = load_for_export(args.checkpoint, use_ema=args.use_ema, overrides=overrides)
    m = exp.model
    log.info("%s %s: %s, %d px, %.2fM parameters", exp.source, exp.name,
             f"{m.num_classes} classes ({m.global_pool} pooling)" if m.num_classes else "backbone (CLS feature)",
             exp.data_config["input_size"][-1], sum(p.numel() for p in m.parameters()) / 1e6)
    if args.hf:
        hf_config_kwargs(m, exp.label_names)  # refuse a model transformers cannot express before writing anything
    save_timm(exp, out)
    hf_dir = save_hf(m, out / "hf", exp.label_names) if args.hf else None
    diffs = verify_export(exp, out, hf_dir) if args.verify else {}
    calls = timm_create_calls(exp, out)

    print(f"exported the {exp.source} {exp.name} to {out.resolve()}")
    if exp.label_names:
        shown = ", ".join(exp.label_names[:5]) + (f" and {len(exp.label_names) - 5} more" if len(exp.label_names) > 5 else "")
        print(f"class names ({len(exp.label_names)}): {shown}: label_names in config.json"
              + (", id2label in hf/config.json" if hf_dir is not None else ""))
    elif m.num_classes:
        print("no class names exported (the checkpoint names none): predictions are label indices")
    ours = model_entrypoint(exp.name).__module__.startswith("mcbeit.")
    imports = f"import timm, mcbeit.models  # mcbeit registers {exp.name}" if ours else "import timm"
    print(f"load it with timm (either call):\n  {imports}\n  " + "\n  ".join(calls))
    if hf_dir is not None:
        cls = "BeitForImageClassification" if m.num_classes else "BeitModel"
        print(f"load it with transformers:\n  transformers.{cls}.from_pretrained({str(hf_dir.resolve())!r})")
    cfg = exp.data_config
    print(f"preprocessing: resize the shorter side to {int(cfg['input_size'][-1] / cfg['crop_pct'])} px ({cfg['interpolation']}), "
          f"center crop {cfg['input_size'][-1]}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}")
    if diffs:
        print("verified on random images, max |difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return {"output": out, "calls": calls, "diffs": diffs}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)  # before torch is imported: --help is instant
    from mcbeit.engine.logging import setup_logging
    from mcbeit.models.export import ExportError

    setup_logging()
    if args.hf:
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()  # one bar per load/save is noise in a command's output
        except ImportError:
            raise SystemExit("mcbeit-export: --hf needs transformers: pip install 'mcbeit[hf]'") from None
    try:
        run(args)
    except (ExportError, InputError) as e:
        raise SystemExit(f"mcbeit-export: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
