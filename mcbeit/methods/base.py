"""What a pre-training method is: where the targets come from, which heads the student has, and
the objective. The pre-training task (:mod:`mcbeit.tasks.pretrain`) runs any method through the one
engine; a method never sees the command line, only the frozen configuration.

A method implements :class:`PretrainMethod` and registers itself in ``mcbeit.methods.METHODS``;
``docs/ADDING_A_METHOD.md`` walks through writing one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from mcbeit.engine.distributed import all_reduce_sum
from mcbeit.engine.task import Mark, MeterSpec, StepOutput

if TYPE_CHECKING:
    from mcbeit.engine.context import RunContext


class PretrainMethod(ABC):
    """One masked-image-modelling method. The task calls, in order: :meth:`check_inputs`,
    :meth:`build` (student and target networks), :meth:`transform` (the data's views and mask), then
    per micro-batch :meth:`step` and per update :meth:`after_update`, per epoch :meth:`start_epoch`
    and :meth:`epoch_values`; :meth:`state` / :meth:`load_state` carry the method's own checkpoint
    entries (an EMA teacher, say)."""

    name: str = ""
    #: what the method logs per update (grad_norm and loss_scale come from the engine)
    meter: MeterSpec = MeterSpec(
        ("loss", "mlm_acc", "grad_norm", "loss_scale"), ("loss", "mlm_acc"),
        {"loss": ("loss", "mlm_acc"), "opt": ("lr", "min_lr", "weight_decay", "grad_norm", "loss_scale")},
        {"loss": ("loss", "{:.4f}"), "mlm_acc": ("mlm_acc", "{:.3f}"), "lr": ("lr", "{:.2e}")})

    #: whether the method feeds a tokenizer a second view at --second_input_size (then the task checks
    #: that view's grid against the ViT's)
    tokenizer_view: bool = False

    #: block masks of exactly --num_mask_patches (BEiT v2's generator tops the drawing up); BEiT's may stop short
    exact_masks: bool = False

    #: the --model names (timm patterns) this method trains
    model_patterns: tuple[str, ...] = ("beit_*_8k_vocab",)

    def __init__(self, config: Any):
        self.config = config
        self.run: RunContext | None = None

    @property
    def downsample(self) -> int | None:
        """Pixels of the second view per target token, once :meth:`build` has loaded the tokenizer."""
        return None

    def check_inputs(self) -> None:
        """Raise :class:`mcbeit.errors.InputError` for target-network files the flags name that cannot be used."""

    @abstractmethod
    def build(self, run: RunContext) -> nn.Module:
        """Build the target networks (on ``run.device``) and return the student (its state dict is the
        checkpoint's ``model``)."""

    @abstractmethod
    def transform(self, window: tuple[int, int], masks: Callable[[np.random.Generator], np.ndarray],
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        """The data transform: ``(image, rng) -> tensors`` for one image, the mask among them."""

    @abstractmethod
    def step(self, batch: Any, mark: Mark | None = None) -> StepOutput:
        """Forward, targets and loss of one micro-batch."""

    def after_update(self, stepped: Any) -> dict[str, torch.Tensor]:
        """After an optimizer update: e.g. the EMA teacher's update. Extra metrics to log."""
        return {}

    def start_epoch(self, epoch: int, first: int = 0) -> None:
        """Per-epoch values (a temperature, a momentum); ``first``: updates of ``epoch`` already done (a resume)."""

    def epoch_values(self, epoch: int) -> dict[str, float]:
        """Per-epoch values for the epoch's log record."""
        return {}

    def epoch_temperatures(self, epoch: int) -> dict[str, float]:
        """The temperatures the objective uses in ``epoch``, by name (TensorBoard's ``temperature/``)."""
        return {}

    def epoch_message(self, stats: Mapping[str, Any]) -> str:
        return (f"loss {stats['train_loss']:.4f}, mlm_acc {stats['train_mlm_acc']:.4f}, lr {stats['train_lr']:.2e}, "
                f"{stats['train_skipped_images']} skipped images")

    def modules_to_compile(self) -> list[nn.Module]:
        """What ``--compile`` compiles besides the student."""
        return []

    def monitored(self, student: nn.Module) -> nn.Module:
        """The network the k-NN monitor measures: the student, or e.g. an EMA teacher that is what fine-tuning takes."""
        return student

    def state(self) -> dict[str, Any]:
        return {}

    def resume_source(self, path: str) -> str:
        """The checkpoint a resume from ``path`` reads (e.g. the student file beside a teacher's copy)."""
        return path

    def saved(self, path: str, name: int | str, flags: Mapping[str, Any]) -> None:
        """On rank 0, after checkpoint ``name`` was written at ``path``: files the method writes beside it."""

    def load_state(self, ckpt: Mapping[str, Any], path: str) -> None:
        """Restore what :meth:`state` wrote."""


def pooled_over_ranks(loss: torch.Tensor, count: torch.Tensor, world_size: int) -> torch.Tensor:
    """``loss`` (this rank's mean over its ``count`` items: masked patches) scaled so that DDP's mean of
    the ranks' gradients is the gradient of the mean over every item of the global batch.

    When ranks hold different counts (block masking), averaging per-rank means is not the pooled
    mean; scaling rank r's loss by world * M_r / M_total makes it so."""
    if world_size == 1:
        return loss
    local = count.to(torch.float32)
    return loss * (local * world_size / all_reduce_sum(local))
