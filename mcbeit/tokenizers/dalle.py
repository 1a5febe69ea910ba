"""DALL-E dVAE encoder (OpenAI) as a frozen tokenizer, and its decoder for looking at tokens.

The module tree and parameter names follow OpenAI's released ``encoder.pkl`` exactly
(``blocks.input.w``, ``blocks.group_1.block_1.id_path.w``,
``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``), so released
weights map one to one onto this module. The architecture: a 7x7 input conv, ``group_count``
groups of ``n_blk_per_group`` residual bottleneck blocks (widths n_hid, 2 n_hid, 4 n_hid, ...)
with a 2x2 max-pool after every group but the last, then ReLU and a 1x1 conv to the vocabulary.
Every residual branch is scaled by ``1 / n_layers**2`` (n_layers = group_count * n_blk_per_group).

The decoder (:class:`DallEDecoder`, OpenAI's ``decoder.pkl``) mirrors it: a 1x1 input conv from
the one-hot vocabulary to ``n_init`` channels, groups of residual blocks (widths 8 n_hid,
4 n_hid, 2 n_hid, n_hid; 1x1-3x3-3x3-3x3 residual branch) with a nearest 2x upsampling after
every group but the last, then ReLU and a 1x1 conv to ``2 * output_channels`` logit-Laplace
statistics. Pixels are ``unmap_pixels(sigmoid(stats[:, :3]))``, as OpenAI's and BEiT's code do.

Numerics: OpenAI's modules ran their hidden convolutions in float16 on CUDA (the encoder's
output conv and the decoder's input conv in float32). Here every conv runs in the dtype of the
input/weights (float32 by default) or under the caller's autocast; logits and decoded pixels
are returned in float32.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import MapPixels, Tokenizer, check_token_ids

DALLE_LOGIT_LAPLACE_EPS = 0.1
DALLE_DEFAULT_CONFIG: Dict[str, int] = dict(
    group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192
)
DALLE_DECODER_DEFAULT_CONFIG: Dict[str, int] = dict(
    group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192
)


def unmap_pixels(x: torch.Tensor, eps: float = DALLE_LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :class:`MapPixels`: [eps, 1 - eps] -> [0, 1], clamped to [0, 1]."""
    return ((x - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)


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


class _DallEResBlock(nn.Module):
    """Residual bottleneck block: ``id_path(x) + post_gain * res_path(x)``.

    ``res_path`` is ReLU + conv four times, widths n_in -> n_out/4 -> n_out/4 -> n_out/4 -> n_out,
    with the kernel widths ``kernels``; ``id_path`` is a 1x1 conv where the widths differ.
    """

    kernels: Sequence[int] = (3, 3, 3, 1)

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1.0 / (n_layers**2)
        self.id_path = DallEConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        for i, kw in enumerate(self.kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = DallEConv2d(widths[i], widths[i + 1], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoderBlock(_DallEResBlock):
    """Encoder block (OpenAI's ``EncoderBlock``): residual kernels 3, 3, 3, 1."""

    kernels = (3, 3, 3, 1)


class DallEDecoderBlock(_DallEResBlock):
    """Decoder block (OpenAI's ``DecoderBlock``): residual kernels 1, 3, 3, 3."""

    kernels = (1, 3, 3, 3)


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
        # OpenAI's decoder.pkl when one was loaded (see attach_decoder); None keeps the encoder alone
        self.register_module("decoder", None)

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

    # ------------------------------------------------------------------ decoding (inspection)
    def attach_decoder(self, decoder: "DallEDecoder") -> "DallEEncoder":
        """Use ``decoder`` for :meth:`decode`; its vocabulary and upsampling must match this encoder."""
        if not isinstance(decoder, DallEDecoder):
            raise TypeError(f"expected a DallEDecoder, got {type(decoder).__name__}")
        if decoder.vocab_size != self.vocab_size or decoder.upsample != self.downsample:
            raise ValueError(
                f"DALL-E decoder (vocab_size {decoder.vocab_size}, f{decoder.upsample}) does not fit the encoder "
                f"(vocab_size {self.vocab_size}, f{self.downsample}): encoder.pkl and decoder.pkl of different models?"
            )
        self.decoder = decoder
        return self

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B,h,w) -> images (B,3,8h,8w) in [0,1]: ``unmap_pixels(sigmoid(decoder(one_hot(ids))[:, :3]))``."""
        if self.decoder is None:
            return super().decode(ids)
        return self.decoder.decode(ids)


def upsampling_groups(block, width_in: int, n_hid: int, group_count: int,
                      n_blk_per_group: int) -> "OrderedDict[str, nn.Module]":
    """``group_1`` .. ``group_<count>`` of a DALL-E-style decoder: ``n_blk_per_group`` residual
    ``block(in, out, n_layers)`` per group, widths 2^(g-1) n_hid ... n_hid, and a nearest 2x
    upsampling after every group but the last (DALL-E's decoder, and the customized VQ decoder)."""
    n_layers = group_count * n_blk_per_group
    groups: "OrderedDict[str, nn.Module]" = OrderedDict()
    for g in range(group_count):
        width_out = n_hid * 2 ** (group_count - 1 - g)  # 8, 4, 2, 1 x n_hid for 4 groups
        group: "OrderedDict[str, nn.Module]" = OrderedDict()
        for i in range(n_blk_per_group):
            group[f"block_{i + 1}"] = block(width_in if i == 0 else width_out, width_out, n_layers)
        if g != group_count - 1:
            group["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
        groups[f"group_{g + 1}"] = nn.Sequential(group)
        width_in = width_out
    return groups


class DallEDecoder(nn.Module):
    """OpenAI's DALL-E decoder (defaults: the released 8192-word model), parameter names as in ``decoder.pkl``.

    ``forward(x (B,V,h,w) float) -> (B, 2*output_channels, h*f, w*f)`` logit-Laplace statistics
    (f = 2**(group_count-1)), as OpenAI's ``Decoder``; :meth:`decode` maps token ids to pixels.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ):
        super().__init__()
        if group_count < 1 or n_init < 1 or n_hid < 1 or n_blk_per_group < 1 or output_channels < 1 or vocab_size < 2:
            raise ValueError(
                f"invalid DALL-E decoder config: group_count={group_count}, n_init={n_init}, n_hid={n_hid}, "
                f"n_blk_per_group={n_blk_per_group}, output_channels={output_channels}, vocab_size={vocab_size}"
            )
        self.group_count = int(group_count)
        self.n_init = int(n_init)
        self.n_hid = int(n_hid)
        self.n_blk_per_group = int(n_blk_per_group)
        self.output_channels = int(output_channels)
        self.vocab_size = int(vocab_size)
        self.upsample = 2 ** (group_count - 1)

        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["input"] = DallEConv2d(vocab_size, n_init, 1)
        layers.update(upsampling_groups(DallEDecoderBlock, n_init, n_hid, group_count, n_blk_per_group))
        layers["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", DallEConv2d(n_hid, 2 * output_channels, 1))])
        )
        self.blocks = nn.Sequential(layers)

    @property
    def config(self) -> Dict[str, Any]:
        return dict(
            group_count=self.group_count,
            n_init=self.n_init,
            n_hid=self.n_hid,
            n_blk_per_group=self.n_blk_per_group,
            output_channels=self.output_channels,
            vocab_size=self.vocab_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.vocab_size:
            raise ValueError(f"DALL-E decoder expects (B, {self.vocab_size}, h, w), got {tuple(x.shape)}")
        return self.blocks(x)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B,h,w) long -> float32 images (B,output_channels,h*f,w*f) in [0,1].

        Same as ``unmap_pixels(sigmoid(self(one_hot(ids))[:, :C]))`` (OpenAI's and BEiT's recipe), with
        the 1x1 input conv of a one-hot map computed as a lookup of its weight columns.
        """
        ids = check_token_ids(ids, self.vocab_size)
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].t()  # (V, n_init)
        h = F.embedding(ids, table).permute(0, 3, 1, 2) + conv.b.view(1, -1, 1, 1)  # (B, n_init, h, w)
        for name, module in self.blocks.named_children():
            if name != "input":
                h = module(h)
        stats = h[:, : self.output_channels].float()
        return unmap_pixels(torch.sigmoid(stats))
