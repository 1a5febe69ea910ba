"""The configuration groups every long run shares: the run itself (output, resume, devices,
launchers, precision, policies) and the optimisation (optimizer, schedules)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from mcbeit.config.fields import Group, flag
from mcbeit.errors import ConfigError


@dataclass(frozen=True)
class RunConfig(Group):
    """What the engine reads: epochs and batches, output and resume, devices and launchers, precision,
    the divergence and bad-data policies. Commands set their own ``output_dir`` default."""

    TITLE: ClassVar[str] = "run"

    epochs: int = flag(300, "epochs to train")
    batch_size: int = flag(64, "images per process and step")
    save_ckpt_freq: int = flag(20, "write checkpoint-<epoch>.pth every N epochs (and after the last)")
    output_dir: str = flag("./output", "where checkpoints, log.txt and tensorboard/ go; '' writes nothing")
    log_dir: str | None = flag(None, "TensorBoard folder", show_default="<output_dir>/tensorboard")
    device: str | None = flag(None, "cuda or cpu", show_default="cuda when present")
    seed: int = flag(0, "random seed (rank r uses seed + r for its data)")
    resume: str = flag("", "resume from this checkpoint", show_default="the newest in --output_dir")
    auto_resume: bool = flag(True, "resume from the newest whole checkpoint in --output_dir",
                             negation="--no_auto_resume", negation_help="start afresh even if --output_dir holds checkpoints")
    save_ckpt_steps: int = flag(0, "also write a checkpoint every N optimizer steps, inside epochs (0: only at epoch "
                                   "ends); a preempted run then loses at most N steps")
    save_ckpt_minutes: float = flag(0.0, "also write a checkpoint when this many minutes passed since the last (0: off)")
    keep_last: int = flag(0, "keep only the newest K checkpoint-<epoch>.pth (0 keeps all, as the original); older ones "
                             "are removed only after a new one is safely written")
    start_epoch: int = flag(0, "first epoch when not resuming")
    num_workers: int = flag(min(10, os.cpu_count() or 1), "data-loader worker processes per rank",
                            show_default=f"min(10, CPUs) = {min(10, os.cpu_count() or 1)}")
    pin_mem: bool = flag(True, "pin host memory for faster copies to the GPU (used with CUDA only)",
                         negation="--no_pin_mem", negation_help="do not pin host memory")
    amp: str | None = flag(None, "mixed precision", choices=("bf16", "fp16", "off"),
                           show_default="bf16 on CUDA (fp16 where bf16 is unsupported), off on CPU")
    print_freq: int = flag(20, "steps between progress-bar / TensorBoard updates (one device read each)")
    max_bad_fraction: float = flag(0.01, "unreadable images (skipped, counted, logged by path) may be at most this share "
                                         "of an epoch's files; more stops the run with exit status 4 (1 disables)")
    max_bad_steps: int = flag(20, "a step with a non-finite gradient is skipped and counted; this many in a row stop "
                                  "the run with exit status 3")
    debug: bool = flag(False, "debug logging")
    world_size: int = flag(1, "number of processes (set by the launcher; accepted for compatibility)")
    local_rank: int = flag(-1, "set by torch.distributed.launch (torchrun uses LOCAL_RANK)", aliases=("--local-rank",))
    dist_on_itp: bool = flag(False, "take rank and world size from OpenMPI's variables (ITP clusters)")
    dist_url: str = flag("env://", "how the processes find each other")
    dist_timeout: float = flag(30.0, "minutes a process waits in a collective for the others (a rank that hung or "
                                     "died); then it stops with exit status 5 and torchrun --max-restarts can restart")

    def check_run(self) -> None:
        """The checks every command shares."""
        at_least(self, 1, ("epochs", "batch_size", "save_ckpt_freq", "print_freq"))
        at_least(self, 0, ("save_ckpt_steps", "save_ckpt_minutes", "keep_last", "start_epoch", "num_workers"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")

    @property
    def tensorboard_dir(self) -> str | None:
        if self.log_dir is not None:
            return self.log_dir
        return os.path.join(self.output_dir, "tensorboard") if self.output_dir else None


@dataclass(frozen=True)
class ImageFolderData(Group):
    """Where the images are: the flags every command that reads an image folder shares."""

    TITLE: ClassVar[str] = "data"

    data_path: str | None = flag(None, "dataset folder: an ImageFolder tree, or train/ + train_map.txt",
                                 show_default="the embedded images")
    data_set: str | None = flag(None, "dataset layout", choices=("CIFAR", "IMNET", "image_folder"),
                                show_default="detected from the folder (and said in the log)")


@dataclass(frozen=True)
class CompileConfig(Group):
    """``torch.compile`` of the model and the loss (pre-training and fine-tuning)."""

    TITLE: ClassVar[str] = "run"

    compile: bool = flag(False, "torch.compile the model and the loss: faster steps after the first ones, which "
                                "compile (minutes on a CPU); see `python -m mcbeit.bench --sections compile`")
    compile_backend: str = flag("inductor", "torch.compile backend (aot_eager or eager find tracing problems fast)")
    compile_mode: str | None = flag(None, "torch.compile mode", choices=("default", "reduce-overhead", "max-autotune"),
                                    show_default="torch's default")


@dataclass(frozen=True)
class OptimConfig(Group):
    """The optimizer and its schedules, as the originals' flags."""

    TITLE: ClassVar[str] = "optimisation"

    opt: str = flag("adamw", "any optimizer timm knows (optionally prefixed 'lookahead_')")
    opt_eps: float = flag(1e-8, "optimizer epsilon")
    opt_betas: tuple[float, ...] | None = flag((0.9, 0.98), "optimizer betas", nargs="+", type=float)
    clip_grad: float | None = flag(None, "clip the gradient norm to this value", type=float,
                                   show_default="no clipping")
    momentum: float = flag(0.9, "SGD momentum")
    weight_decay: float = flag(0.05, "weight decay (none for biases, 1-D parameters, pos_embed and cls_token)")
    weight_decay_end: float | None = flag(None, "final weight decay of its cosine schedule", type=float,
                                          show_default="= --weight_decay")
    lr: float = flag(5e-4, "peak learning rate")
    warmup_lr: float = flag(1e-6, "accepted for compatibility: the original's warm-up starts at 0 and never reads it")
    min_lr: float = flag(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: int = flag(5, "linear LR warm-up, in epochs")
    warmup_steps: int = flag(-1, "linear LR warm-up in steps; overrides --warmup_epochs when > 0")

    def check_optim(self) -> None:
        at_least(self, 0, ("lr", "min_lr", "weight_decay", "warmup_epochs"))
        if self.opt_betas is not None and len(self.opt_betas) != 2:
            raise ConfigError(f"--opt_betas takes two numbers, got {list(self.opt_betas)}")

    @property
    def final_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay_end is None else self.weight_decay_end


def at_least(config: object, minimum: float, names) -> None:
    """``--name must be at least MINIMUM, got VALUE`` for the first of ``names`` below ``minimum``
    (names the configuration does not have, or left at None, are skipped)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} must be at least {minimum}, got {value}")
