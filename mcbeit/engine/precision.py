"""The one place that decides a run's numeric precision.

``--amp`` (bf16 / fp16 / off; by default bf16 on CUDA, fp16 where bf16 is unsupported, off on a
CPU) gives three things, all decided here:

- the autocast dtype of the trained model's forward (None: fp32);
- the gradient scaler (fp16 only, CUDA only);
- the precision of frozen target networks (tokenizers, EMA teachers): the run's dtype where the
  device computes it natively, fp32 where it would only be emulated (a frozen network gains
  nothing from slower low precision: the VQGAN tokenizer ran 7x slower in emulated bf16).

Under DeepSpeed the engine autocasts itself (its ``torch_autocast`` section): the trained model's
dtype is then DeepSpeed's and there is no scaler of ours.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from mcbeit.errors import ConfigError

__all__ = ["Precision", "resolve_precision", "native_low_precision", "autocast_context"]


@functools.lru_cache(maxsize=None)  # asked every step; the answer is the hardware's
def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes in ``dtype`` (bf16 / fp16) natively: every GPU autocast supports;
    a CPU only with AVX-512-BF16 / AVX512-FP16 or AMX, else oneDNN emulates it, several times
    slower than fp32 (the VQGAN tokenizer ~7x on an AVX2 CPU)."""
    if device.type != "cpu":
        return True
    check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
             torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    return check is not None and bool(check())


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Precision:
    """A run's precision: see the module docstring."""

    device: torch.device
    dtype: torch.dtype | None = None                 # autocast dtype of the trained model (None: fp32)
    scaler: torch.amp.GradScaler | None = None       # fp16 on CUDA only

    @property
    def target_dtype(self) -> torch.dtype | None:
        """The autocast dtype of frozen target networks: the run's, or fp32 (None) where it is emulated."""
        if self.dtype is None or not native_low_precision(self.device, self.dtype):
            return None
        return self.dtype

    def autocast(self):
        """The trained model's forward and loss."""
        return autocast_context(self.device, self.dtype)

    def target_autocast(self):
        """A frozen target network's forward (tokenizer, teacher)."""
        return autocast_context(self.device, self.target_dtype)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")


def resolve_precision(amp: str | None, device: torch.device, *, scaler: bool = True) -> Precision:
    """The :class:`Precision` of ``--amp`` on ``device``; ``scaler=False`` (DeepSpeed, which scales
    itself) leaves the gradient scaler out."""
    if amp is None:
        if device.type != "cuda":
            return Precision(device)
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return Precision(device)
    if amp == "bf16":
        return Precision(device, torch.bfloat16)
    if device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (fp16 needs a gradient scaler and is slow on CPU); "
                          "use --amp bf16 or --amp off on CPU")
    return Precision(device, torch.float16, torch.amp.GradScaler("cuda") if scaler else None)
