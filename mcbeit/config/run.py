"""The configuration groups every long run shares: the run itself (output, resume, devices,
launchers, precision, policies) and the optimisation (optimizer, schedules)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

from mcbeit.config.fields import Group, experiment_flags, flag
from mcbeit.errors import ConfigError


@dataclass(frozen=True)
class RunConfig(Group):
    """What the engine reads: epochs and batches, output and resume, devices and launchers, precision,
    the divergence and bad-data policies. Commands set their own ``output_dir`` default."""

    TITLE: ClassVar[str] = "run"

    epochs: int = flag(300, "epochs to train")
    batch_size: int = flag(64, "images per process and step")
    save_ckpt_freq: int = flag(20, "write checkpoint-<epoch>.pth every N epochs (and after the last)", experiment=False)
    output_dir: str = flag("./output", "where checkpoints, log.txt and tensorboard/ go; '' writes nothing",
                           experiment=False)
    log_dir: str | None = flag(None, "TensorBoard folder", show_default="<output_dir>/tensorboard", experiment=False)
    device: str | None = flag(None, "cuda or cpu", show_default="cuda when present", experiment=False)
    seed: int = flag(0, "random seed (rank r uses seed + r for its data)")
    resume: str = flag("", "resume from this checkpoint", show_default="the newest in --output_dir", experiment=False)
    auto_resume: bool = flag(True, "resume from the newest whole checkpoint in --output_dir, if it was written with "
                                   "this run's experiment flags (see --accept_changed_flags)",
                             negation="--no_auto_resume", negation_help="start afresh; refused while --output_dir holds "
                                                                        "checkpoints (see --start_over)",
                             experiment=False)
    accept_changed_flags: tuple[str, ...] = flag(
        (), "auto-resume although these flags differ from the checkpoint's ('all': any flag); without it a changed "
            "flag that defines the experiment (model, data, method, objective, total batch, schedules, epochs) stops "
            "the run before training, naming each", nargs="+", type=str, metavar="NAME", show_default="none",
        experiment=False)
    start_over: bool = flag(False, "move the checkpoints, log.txt and tensorboard/ of --output_dir into "
                                   "<output_dir>/replaced-<time>/, then train from the start (pass it once: a rerun "
                                   "with it starts over again)", experiment=False)
    save_ckpt_steps: int = flag(0, "also write a checkpoint every N optimizer steps, inside epochs (0: only at epoch "
                                   "ends); a preempted run then loses at most N steps. These are transient resume "
                                   "points, checkpoint-<epoch>-step<N>.pth: each is removed once a newer checkpoint "
                                   "is safely written", experiment=False)
    save_ckpt_minutes: float = flag(0.0, "also write a checkpoint when this many minutes passed since the last (0: off)",
                                    experiment=False)
    keep_last: int = flag(0, "keep only the newest K checkpoint-<epoch>.pth (epoch ends; 0 keeps all, as the original); "
                             "older ones are removed only after a new one is safely written", experiment=False)
    start_epoch: int = flag(0, "first epoch when not resuming", experiment=False)
    num_workers: int = flag(min(10, os.cpu_count() or 1), "data-loader worker processes per rank",
                            show_default=f"min(10, CPUs) = {min(10, os.cpu_count() or 1)}", experiment=False)
    pin_mem: bool = flag(True, "pin host memory for faster copies to the GPU (used with CUDA only)",
                         negation="--no_pin_mem", negation_help="do not pin host memory", experiment=False)
    amp: str | None = flag(None, "mixed precision", choices=("bf16", "fp16", "off"),
                           show_default="bf16 on CUDA (fp16 where bf16 is unsupported), off on CPU", experiment=False)
    print_freq: int = flag(20, "steps between progress-bar / TensorBoard updates (one device read each)",
                           experiment=False)
    max_bad_fraction: float = flag(0.01, "unreadable images (skipped, counted, logged by path) may be at most this share "
                                         "of an epoch's files; more stops the run with exit status 4 (1 disables)",
                                   experiment=False)
    max_bad_steps: int = flag(20, "a step with a non-finite gradient is skipped and counted; this many in a row stop "
                                  "the run with exit status 3", experiment=False)
    debug: bool = flag(False, "debug logging", experiment=False)
    world_size: int = flag(1, "number of processes (set by the launcher; accepted for compatibility)", experiment=False)
    local_rank: int = flag(-1, "set by torch.distributed.launch (torchrun uses LOCAL_RANK)", aliases=("--local-rank",),
                           experiment=False)
    dist_on_itp: bool = flag(False, "take rank and world size from OpenMPI's variables (ITP clusters)",
                             experiment=False)
    dist_url: str = flag("env://", "how the processes find each other", experiment=False)
    dist_timeout: float = flag(30.0, "minutes a process waits in a collective for the others (a rank that hung or "
                                     "died); then it stops with exit status 5 and torchrun --max-restarts can restart",
                               experiment=False)

    def check_run(self) -> None:
        """The checks every command shares."""
        at_least(self, 1, ("epochs", "batch_size", "save_ckpt_freq", "print_freq"))
        at_least(self, 0, ("save_ckpt_steps", "save_ckpt_minutes", "keep_last", "start_epoch", "num_workers"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        check_accepted(type(self), self.accept_changed_flags)

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
                                "compile (minutes on a CPU); see `python -m mcbeit.bench --sections compile`",
                         experiment=False)
    compile_backend: str = flag("inductor", "torch.compile backend (aot_eager or eager find tracing problems fast)",
                                experiment=False)
    compile_mode: str | None = flag(None, "torch.compile mode", choices=("default", "reduce-overhead", "max-autotune"),
                                    show_default="torch's default", experiment=False)


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
    warmup_lr: float = flag(1e-6, "accepted for compatibility: the original's warm-up starts at 0 and never reads it",
                            experiment=False)
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


def check_accepted(cls: type, names: tuple[str, ...]) -> None:
    """``--accept_changed_flags``: each name is a flag of ``cls`` that defines the experiment, or 'all'."""
    defining = set(experiment_flags(cls))
    for name in names:
        if name == "all" or name.lstrip("-") in defining:
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        why = ("may differ anyway: it does not change the experiment" if name.lstrip("-") in known else
               "is no flag of this command")
        raise ConfigError(f"--accept_changed_flags {name}: --{name.lstrip('-')} {why}; name flags such as lr, "
                          "batch_size, epochs, data_path (or 'all')")


def at_least(config: object, minimum: float, names) -> None:
    """``--name must be at least MINIMUM, got VALUE`` for the first of ``names`` below ``minimum``
    (names the configuration does not have, or left at None, are skipped)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} must be at least {minimum}, got {value}")
