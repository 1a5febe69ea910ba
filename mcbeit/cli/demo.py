"""`mcbeit-demo`: does pre-training here produce useful features? Measured on the embedded images,
with error bars, on a CPU (issue 15).

    mcbeit-demo                                   # 3 seeds; about 15 minutes on 2 CPU cores
    mcbeit-demo --seeds 0 1 2 3 4 --output_dir ./output/demo5

1. trains one tokenizer on the embedded train images (``mcbeit-tokenizer train``, its embedded
   defaults, seed 0), shared by every seed;
2. per seed, pre-trains (``mcbeit-pretrain`` on the embedded images with that tokenizer, ``--seed
   S``), with the k-NN monitor and its linear probe after every epoch;
3. per seed, measures the same student at initialisation (the weights that run started from: the
   same seed, the same construction) with the same monitor: the random-initialisation baseline;
4. prints the table (mean +- sample std over seeds) and writes it with every figure to
   ``demo.json`` and the k-NN curve against epochs to ``knn_vs_epochs.png``.

Each step is an ordinary command whose output stays in ``--output_dir`` (``tokenizer/``,
``pretrain-seed<S>/``); a rerun reuses what is finished and resumes what is not.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger("mcbeit.demo")
PROG = "mcbeit-demo"

#: the figures of the table: (log.txt key, row label)
FIGURES = (("knn_top1", "k-NN top-1, last block"),
           ("linear_patch_mean_top1", "linear probe top-1, last block"),
           ("knn_patch_mean@{block}_k20_top1", "k-NN top-1, block {block}"),
           ("linear_patch_mean@{block}_top1", "linear probe top-1, block {block}"))
#: pre-training flags of the demonstration beyond the embedded defaults: the monitor and its linear
#: probe after every epoch, and batches of 8 instead of 32: a tiny ViT's features move with the number
#: of updates more than with the images per update (500 updates in 5 epochs, in about the same CPU time)
PRETRAIN_FLAGS = ("--eval_freq", "1", "--eval_linear", "--batch_size", "8")
#: pre-training epochs unless --epochs says otherwise
EPOCHS = 5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="./output/demo", help="where every run and the results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pre-training seeds (at least 2 for a std)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="pre-training epochs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--num_workers", type=int, default=None, help="data-loader workers of every run")
    p.add_argument("pretrain_flags", nargs=argparse.REMAINDER, metavar="-- FLAGS",
                   help="flags after -- go to every mcbeit-pretrain run (e.g. -- --lr 1e-3 --model "
                        "beit_small_patch16_224_8k_vocab); a rerun must pass the same")
    return p


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd[2:]))
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{PROG}: {what} failed (exit {proc.returncode}):\n{tail}")
    log.info("%s: done in %.0f s", what, time.perf_counter() - started)


def _rows(folder: Path) -> list[dict]:
    path = folder / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _common(args: argparse.Namespace) -> list[str]:
    out = []
    if args.device:
        out += ["--device", args.device]
    if args.num_workers is not None:
        out += ["--num_workers", str(args.num_workers)]
    return out


def pretrain_flags(args: argparse.Namespace, seed: int, tokenizer: Path, output_dir: Path) -> list[str]:
    flags = ["--output_dir", str(output_dir), "--seed", str(seed), "--discrete_vae_type", "customized",
             "--discrete_vae_weight_path", str(tokenizer), *PRETRAIN_FLAGS, *_common(args)]
    extra = [f for f in args.pretrain_flags if f != "--"]
    return flags + (["--epochs", str(args.epochs)] if args.epochs else []) + extra


def initial_figures(flags: list[str]) -> dict:
    """The monitor's figures for the student a ``mcbeit-pretrain`` with ``flags`` starts from."""
    import torch

    from mcbeit.cli.pretrain import get_args_parser as pretrain_parser, resolve_defaults
    from mcbeit.data.transforms import normalisation
    from mcbeit.engine.distributed import DistInfo, resolve_device
    from mcbeit.engine.trainer import Trainer
    from mcbeit.tasks.pretrain import PretrainTask, build_monitor

    cfg = resolve_defaults(pretrain_parser().parse_args(flags))
    task = PretrainTask(cfg)
    task.check_inputs()
    run = Trainer(cfg, task).build(DistInfo(device=resolve_device(cfg.device)))   # seeded as the run's start
    mean, std = normalisation(cfg.imagenet_default_mean_and_std)
    monitor = build_monitor(cfg, len(task.model.blocks), mean, std)
    with torch.no_grad():
        return monitor.measure(task.model, run.device, run.precision.target_dtype)


def summarise(finals: list[dict], initials: list[dict], block: int) -> list[dict]:
    """Per figure: mean and sample std over seeds, pre-trained and at initialisation."""
    rows = []
    for key, label in FIGURES:
        key, label = key.format(block=block), label.format(block=block)
        pre, ini = [f[key] for f in finals], [f[key] for f in initials]
        rows.append({"figure": label, "key": key, "pretrained": pre, "initial": ini,
                     "pretrained_mean": statistics.fmean(pre), "initial_mean": statistics.fmean(ini),
                     "pretrained_std": statistics.stdev(pre) if len(pre) > 1 else 0.0,
                     "initial_std": statistics.stdev(ini) if len(ini) > 1 else 0.0})
    return rows


def format_table(rows: list[dict], seeds: int) -> str:
    lines = [f"| frozen features, 200 val images, 10 classes ({seeds} seeds) | random init | pre-trained |",
             "| --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['initial_mean']:.1f} ± {r['initial_std']:.1f} % "
                     f"| {r['pretrained_mean']:.1f} ± {r['pretrained_std']:.1f} % |")
    return "\n".join(lines)


def plot(curves: dict[int, list[dict]], initials: list[dict], path: Path) -> Path:
    """k-NN and linear-probe top-1 against epochs: a thin line per seed from its initial weights (epoch
    0), the seeds' mean in bold, the initial weights' mean dashed, chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, key, name in zip(axes, ("knn_top1", "linear_patch_mean_top1"),
                             ("weighted k-NN top-1 (%)", "linear probe top-1 (%)"), strict=True):
        per_seed = []
        for initial, rows in zip(initials, curves.values(), strict=True):
            xs, ys = [0] + [r["epoch"] + 1 for r in rows], [initial[key]] + [r[key] for r in rows]
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=1)
            per_seed.append(dict(zip(xs, ys, strict=True)))
        xs = sorted(set.intersection(*(set(c) for c in per_seed)))
        start = statistics.fmean(i[key] for i in initials)
        ax.plot(xs, [statistics.fmean(c[x] for c in per_seed) for x in xs], color="tab:blue", lw=2.5, marker="o",
                label=f"pre-training (mean of {len(per_seed)} seeds)")
        ax.axhline(start, color="tab:gray", ls="--", label="random initialisation (mean)")
        ax.axhline(10.0, color="tab:red", ls=":", lw=1, label="chance (10 classes)")
        ax.set_xlabel("pre-training epochs")
        ax.set_title(f"{name}, val, last block")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("mcbeit-demo: frozen features of the embedded images")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> dict:
    from mcbeit.engine.checkpoint import write_atomic
    from mcbeit.evaluation.monitor import default_block

    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"{PROG}: --seeds {' '.join(map(str, args.seeds))} repeats a seed")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = out / "tokenizer" / "tokenizer.pth"
    if not tokenizer.is_file():
        _run(_python("mcbeit.cli.tokenizer", "train", "--output_dir", str(tokenizer.parent), "--seed", "0",
                     *_common(args)), "tokenizer (embedded train images)")
    finals, initials, curves = [], [], {}
    for seed in args.seeds:
        folder = out / f"pretrain-seed{seed}"
        flags = pretrain_flags(args, seed, tokenizer, folder)
        rows = _rows(folder)
        if not (rows and "knn_top1" in rows[-1] and (not args.epochs or rows[-1]["epoch"] + 1 >= args.epochs)):
            _run(_python("mcbeit.cli.pretrain", *flags), f"pre-training, seed {seed}")
            rows = _rows(folder)
        measured = [r for r in rows if "knn_top1" in r]
        finals.append(measured[-1])
        curves[seed] = [{k: r[k] for k in ("epoch", "knn_top1", "linear_patch_mean_top1")} for r in measured]
        log.info("random initialisation, seed %d: measuring", seed)
        initials.append(initial_figures(flags))
    block = default_block(12)
    table = summarise(finals, initials, block)
    png = plot(curves, initials, out / "knn_vs_epochs.png")
    result = {"seeds": args.seeds, "epochs": finals[0]["epoch"] + 1, "table": table,
              "pretrained": finals, "initial": initials, "curves": {str(k): v for k, v in curves.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    text = (json.dumps(result, indent=1) + "\n").encode()
    write_atomic(out / "demo.json", lambda f: f.write(text))
    print(format_table(table, len(args.seeds)))
    print(f"\n{len(args.seeds)} seeds, {result['epochs']} pre-training epochs each; {result['seconds']:.0f} s "
          f"(reused runs not counted); figures in {out / 'demo.json'}, curve in {png}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from mcbeit.engine.logging import setup_logging

    setup_logging()
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
