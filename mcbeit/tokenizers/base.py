"""Common base of the frozen visual tokenizers.

A tokenizer turns the second view of a crop (normalised by its own ``input_transform``)
into logits over its vocabulary, one vector per cell of an ``h x w`` grid whose cells are
``downsample`` pixels wide. Subclasses implement :meth:`Tokenizer.compute_logits`.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

SizeLike = Union[int, Sequence[int]]


def _pair(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image size must be an int or a (height, width) pair, got {size!r}")
    return size  # type: ignore[return-value]


class MapPixels:
    """DALL-E's pixel map ``x * (1 - 2 eps) + eps``: [0, 1] -> [eps, 1 - eps].

    A plain picklable callable (it travels into DataLoader workers).
    """

    def __init__(self, eps: float = 0.1):
        self.eps = float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"MapPixels expects a float tensor in [0, 1], got {x.dtype}")
        return x * (1.0 - 2.0 * self.eps) + self.eps

    def __repr__(self) -> str:
        return f"MapPixels(eps={self.eps})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MapPixels) and other.eps == self.eps


class Normalize:
    """Per-channel ``(x - mean) / std`` on a float ``(C, H, W)`` (or ``(B, C, H, W)``) tensor.

    A plain picklable callable (it travels into DataLoader workers).
    """

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} have different lengths")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"Normalize expects a float tensor in [0, 1], got {x.dtype}")
        channels = x.shape[-3]
        if channels != len(self.mean):
            raise ValueError(f"Normalize built for {len(self.mean)} channels, input has {channels}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normalize) and (other.mean, other.std) == (self.mean, self.std)


class Tokenizer(nn.Module):
    """Frozen image tokenizer: ``forward(images (B,3,H,W)) -> float32 logits (B,V,H/d,W/d)``.

    Attributes:
        vocab_size: V, the number of visual words.
        downsample: d, pixels per token along each side (8 for every released tokenizer).
        image_size: the (square) input size the tokenizer is used at, e.g. 112.
        random_weights: True when no trained weights were loaded.
        input_transform: picklable callable mapping a float (3,H,W) tensor in [0,1] to the
            tokenizer's normalised input.
        kind: the factory kind that builds this tokenizer.
    """

    kind: str = "abstract"

    def __init__(self, *, vocab_size: int, downsample: int, image_size: int, input_transform, in_channels: int = 3):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.downsample = int(downsample)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.input_transform = input_transform
        self.random_weights = True
        self.token_grid(self.image_size)  # validate early

    # ------------------------------------------------------------------ geometry
    def check_input_size(self, height: int, width: int) -> None:
        d = self.downsample
        if height % d or width % d or height <= 0 or width <= 0:
            raise ValueError(
                f"{type(self).__name__} downsamples by {d}: the input size must be a positive "
                f"multiple of {d}, got {height}x{width} (use e.g. --second_input_size "
                f"{max(d, (height // d) * d)})"
            )

    def token_grid(self, image_size: SizeLike | None = None) -> Tuple[int, int]:
        """The ``(h, w)`` token grid for an input of ``image_size`` (default: ``self.image_size``)."""
        height, width = _pair(self.image_size if image_size is None else image_size)
        self.check_input_size(height, width)
        return height // self.downsample, width // self.downsample

    # ------------------------------------------------------------------ forward
    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {images.shape[1]}")
        if not torch.is_floating_point(images):
            raise TypeError(f"expected a float tensor (already normalised by input_transform), got {images.dtype}")
        self.check_input_size(images.shape[-2], images.shape[-1])
        return self.compute_logits(images).float()

    # ------------------------------------------------------------------ decoding (inspection)
    @property
    def has_decoder(self) -> bool:
        """True when :meth:`decode` can turn token ids back into pixels (a decoder was loaded)."""
        return False

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B,h,w) long -> images (B,3,h*d,w*d) float in [0,1] (for looking at tokens)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no decoder loaded: token maps can be shown, reconstructions cannot")

    # ------------------------------------------------------------------ helpers
    def channels_last(self) -> "Tokenizer":
        """Convolution weights (and so activations) in channels-last layout, for pre-training.

        oneDNN's CPU convolutions run about 1.15-1.2x faster this way (the benchmark's tokenizer
        phase) and it is the layout tensor cores want on CUDA. Logits move by ~1e-5 relative (another
        convolution algorithm), hard ids stay the same; the layout is not part of the weights."""
        if any(p.dim() == 4 for p in self.parameters()):  # convolution kernels (DALL-E's are its own class)
            self.to(memory_format=torch.channels_last)
        return self

    def freeze(self) -> "Tokenizer":
        """Eval mode, no gradients: the tokenizer is a fixed target network."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, vocab_size={self.vocab_size}, downsample={self.downsample}, "
            f"image_size={self.image_size}, random_weights={self.random_weights}"
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``ids`` as a (B,h,w) int64 tensor of valid token ids, or a ValueError/TypeError saying what is wrong."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token ids must be an integer tensor (B, h, w), got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() != 3:
        raise ValueError(f"token ids must have shape (B, h, w), got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got min {int(ids.min())}, max {int(ids.max())}")
    return ids.long()
