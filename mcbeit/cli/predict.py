"""`mcbeit-predict`: what a model says about some images, from the command line (the Python API's
:func:`mcbeit.inference_model`).

    mcbeit-predict bird.jpg cat.png --model output/mcbeit_finetuned                 # top classes
    mcbeit-predict street.jpg --model output/mcbeit_seg --out preds/                # + label maps and pictures
    mcbeit-predict scene.jpg --model output/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit --score_threshold 0.5
    mcbeit-predict img.jpg --model output/mcbeit_pretrained --tokenizer /weights/vqgan   # visual tokens

``--model`` takes what :func:`mcbeit.get_model` takes: a checkpoint, a run's output folder, an ``mcbeit-export``
folder, a released file, or a model name (with ``--pretrained FILE``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from mcbeit.errors import InputError

PROG = "mcbeit-predict"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        PROG, description="Predictions of any model of this package for some images: classes (fine-tuned "
                          "classifiers), label maps (mcbeit-seg), boxes and masks (mcbeit-det), visual tokens "
                          "(pre-training checkpoints).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", required=True, metavar="NAME_OR_CKPT",
                   help="a checkpoint file or a run's output folder of any mcbeit command, an mcbeit-export folder, "
                        "a released file, or a model name (python -c 'import mcbeit; print(mcbeit.list_models())')")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="weights for a model name (a checkpoint or a released file)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write <DIR>/<image name>.png pictures of the predictions (segmentation: also "
                        "<name>_label.png, the class map as 8- or 16-bit PNG)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the predictions as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    p.add_argument("--topk", type=int, default=5, help="classes printed per image (classifiers)")
    p.add_argument("--score_threshold", type=float, default=None,
                   help="detections printed and drawn from this score (default: printed from the model's 0.05, drawn "
                        "from 0.3)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="pre-training models: the tokenizer's weights, to compare the predicted visual tokens with "
                        "its own and reconstruct (default: the checkpoint's, if its file is still there)")
    p.add_argument("--seed", type=int, default=0, help="pre-training models: the mask's draw")
    return p


def _summary(kind: str, result: dict, topk: int) -> list[str]:
    """Lines describing one image's result."""
    import numpy as np

    if kind == "classifier":
        scores = result["pred_scores"]
        top = scores.argsort()[::-1][:max(1, topk)]
        names = result.get("_classes") or []
        return [f"  {names[i] if i < len(names) else i}: {scores[i]:.4f}" for i in top]
    if kind == "segmentation":
        label, classes = result["pred_sem_seg"], result["classes"]
        values, counts = np.unique(label, return_counts=True)
        order = counts.argsort()[::-1]
        return [f"  {classes[values[i]] if values[i] < len(classes) else values[i]}: {100 * counts[i] / label.size:.1f}%"
                for i in order[:10]]
    if kind == "detection":
        return [f"  {c} {s:.3f} [{' '.join(f'{v:.1f}' for v in box)}]"
                for c, s, box in zip(result["classes"], result["scores"], result["boxes"], strict=True)]
    lines = [f"  masked patches: {int(result['mask'].sum())} of {result['mask'].size}"]
    for key in ("token_accuracy", "patch_accuracy"):
        if key in result:
            lines.append(f"  {key.replace('_', ' ')} on the masked patches: {result[key]:.3f}")
    if "pred_tokens" in result:
        lines.append(f"  predicted tokens (first row): {' '.join(map(str, result['pred_tokens'][0]))}")
    return lines


def _plain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN (no masked patch): JSON's null
        return None
    return value


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import mcbeit
    from mcbeit.api.visualise import render, save_png

    if args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.out is not None and Path(args.out).is_file():
        raise InputError(f"--out {args.out} is a file: pass a folder for the pictures")
    model = mcbeit.get_model(args.model, pretrained=args.pretrained or False, device=args.device)
    info = model.mcbeit
    print(f"{info.kind} {info.name} ({info.source or 'random weights'}) on {next(model.parameters()).device}")
    results = mcbeit.inference_model(model, list(args.images), batch_size=args.batch_size, tokenizer=args.tokenizer,
                                     seed=args.seed, score_threshold=args.score_threshold)
    records, stems = [], set()
    for path, result in zip(args.images, results, strict=True):
        if info.kind == "classifier":
            print(f"{path}: {result['pred_class']} ({result['pred_score']:.4f})")
        elif info.kind == "detection":
            print(f"{path}: {len(result['scores'])} detections")
        else:
            print(f"{path}:")
        for line in _summary(info.kind, {**result, "_classes": info.classes}, args.topk):
            print(line)
        if args.out is not None:
            stem = Path(path).stem
            if stem in stems:  # two images of one name from different folders: both pictures kept
                stem = f"{stem}_{len(records)}"
            stems.add(stem)
            drawn = 0.3 if args.score_threshold is None else args.score_threshold
            save_png(os.path.join(args.out, f"{stem}.png"), render(model, path, result, drawn))
            if info.kind == "segmentation":
                label = result["pred_sem_seg"]
                dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
                save_png(os.path.join(args.out, f"{stem}_label.png"), label.astype(dtype))
        records.append({"image": path, **{k: _plain(v) for k, v in result.items()
                                          if k not in ("masks", "reconstruction")}})
    if args.out is not None:
        print(f"pictures in {args.out}")
    if args.json is not None:
        from mcbeit.engine.checkpoint import write_atomic

        text = json.dumps({"model": str(args.model), "kind": info.kind, "results": records}) + "\n"
        write_atomic(args.json, lambda f: f.write(text.encode()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)  # before torch is imported: --help is instant
    from mcbeit.engine.logging import setup_logging

    setup_logging()
    try:
        return run(args)
    except InputError as e:
        raise SystemExit(f"{PROG}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
