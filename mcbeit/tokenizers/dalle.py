"""DALL-E dVAE encoder (OpenAI) as a frozen tokenizer.

The module tree and parameter names follow OpenAI's released ``encoder.pkl`` exactly
(``blocks.input.w``, ``blocks.group_1.block_1.id_path.w``,
``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``), so released
weights map one to one onto this module. The architecture: a 7x7 input conv, ``group_count``
groups of ``n_blk_per_group`` residual bottleneck blocks (widths n_hid, 2 n_hid, 4 n_hid, ...)
with a 2x2 max-pool after every group but the last, then ReLU and a 1x1 conv to the vocabulary.
Every residual branch is scaled by ``1 / n_layers**2`` (n_layers = group_count * n_blk_per_group).

Numerics: OpenAI's module ran its hidden convolutions in float16 on CUDA (the output conv in
float32). Here every conv runs in the dtype of the input/weights (float32 by default) or
under the caller's autocast; the logits are returned in float32.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .base import MapPixels, Tokenizer

DALLE_LOGIT_LAPLACE_EPS = 0.1
DALLE_DEFAULT_CONFIG: Dict[str, int] = dict(
    group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192
)


class DallEConv2d(nn.Module):
    """Square 'same' convolution with parameters named ``w`` and ``b`` as in OpenAI's code."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"channels must be positive, got n_in={n_in}, n_out={n_out}")
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"kernel width must be a positive odd number, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.normal_(std=1.0 / math.sqrt(self.n_in * self.kw**2))
            self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kernel_size={self.kw}"


class DallEEncoderBlock(nn.Module):
    """Residual bottleneck block: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1.0 / (n_layers**2)
        self.id_path = DallEConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", DallEConv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", DallEConv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", DallEConv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", DallEConv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoder(Tokenizer):
    """OpenAI's DALL-E encoder (defaults: the released 8192-word f8 model) as a Tokenizer.

    Input: images mapped by :class:`MapPixels` (eps 0.1), i.e. values in [0.1, 0.9].
    """

    kind = "dall-e"

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        image_size: int = 112,
        input_transform=None,
    ):
        if group_count < 1 or n_blk_per_group < 1 or n_hid < 1 or vocab_size < 2:
            raise ValueError(
                f"invalid DALL-E encoder config: group_count={group_count}, n_hid={n_hid}, "
                f"n_blk_per_group={n_blk_per_group}, vocab_size={vocab_size}"
            )
        if input_transform is None:
            input_transform = MapPixels(DALLE_LOGIT_LAPLACE_EPS)
        super().__init__(
            vocab_size=vocab_size,
            downsample=2 ** (group_count - 1),
            image_size=image_size,
            input_transform=input_transform,
            in_channels=input_channels,
        )
        self.group_count = int(group_count)
        self.n_hid = int(n_hid)
        self.n_blk_per_group = int(n_blk_per_group)
        self.input_channels = int(input_channels)

        n_layers = group_count * n_blk_per_group
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["input"] = DallEConv2d(input_channels, n_hid, 7)
        width_in = n_hid
        for g in range(group_count):
            width_out = n_hid * 2**g
            group: "OrderedDict[str, nn.Module]" = OrderedDict()
            for i in range(n_blk_per_group):
                group[f"block_{i + 1}"] = DallEEncoderBlock(width_in if i == 0 else width_out, width_out, n_layers)
            if g != group_count - 1:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            layers[f"group_{g + 1}"] = nn.Sequential(group)
            width_in = width_out
        layers["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", DallEConv2d(width_in, vocab_size, 1))])
        )
        self.blocks = nn.Sequential(layers)

    @property
    def config(self) -> Dict[str, Any]:
        return dict(
            group_count=self.group_count,
            n_hid=self.n_hid,
            n_blk_per_group=self.n_blk_per_group,
            input_channels=self.input_channels,
            vocab_size=self.vocab_size,
        )

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.blocks.input.w
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(weight.dtype)
        return self.blocks(images)
