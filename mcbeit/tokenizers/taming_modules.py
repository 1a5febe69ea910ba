"""taming-transformers' VQGAN modules, re-implemented with its state-dict names.

Architecture of taming's ``Encoder`` (temb-free): ``conv_in`` (3x3), per resolution level
``num_res_blocks`` ResnetBlocks (GroupNorm(32, eps 1e-6) + swish + 3x3 conv, twice; 1x1
``nin_shortcut`` when the width changes), an AttnBlock after each block at the levels whose
nominal resolution (``resolution`` halved per level) is in ``attn_resolutions``, a stride-2 3x3
``Downsample`` with asymmetric (0, 1, 0, 1) zero padding between levels; then
``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``, swish and ``conv_out``. The
``Decoder`` mirrors it (see :class:`VQGANDecoder`). The quantizers here compute only what a
tokenizer needs: logits (Gumbel projection) or negative squared distances (EMA codebook).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("mcbeit.tokenizers.vqgan")

#: ddconfig keys the encoder understands; the others (out_ch, give_pre_end, ...) are decoder-only.
_ENCODER_KEYS = {
    "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
    "in_channels", "resolution", "z_channels", "double_z",
}
_DECODER_ONLY_KEYS = {"out_ch", "give_pre_end", "tanh_out", "use_linear_attn", "attn_type"}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # x * sigmoid(x)


class ResnetBlock(nn.Module):
    """taming's ResnetBlock without the timestep embedding (the encoder has temb_ch = 0)."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = _group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C): one head, softmax(q k^T / sqrt(C)) v
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv after (left 0, right 1, top 0, bottom 1) zero
    padding (taming's asymmetric padding), or 2x2 average pooling when ``with_conv`` is False."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _Level(nn.Module):
    """One resolution level of the encoder: ``block`` / ``attn`` lists and an optional ``downsample``."""

    def __init__(self, block: List[nn.Module], attn: List[nn.Module], downsample: Optional[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)
        if downsample is not None:
            self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VQGANEncoder(nn.Module):
    """taming's ``Encoder`` (same module tree and state-dict names), configured by a ddconfig."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        double_z: bool = True,
    ):
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = double_z
        attn_resolutions = {int(r) for r in attn_resolutions}

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        levels = []
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            downsample = None
            if i_level != self.num_resolutions - 1:
                downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            levels.append(_Level(blocks, attns, downsample))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv when ``with_conv``."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _UpLevel(nn.Module):
    """One resolution level of the decoder: ``block`` / ``attn`` lists and an optional ``upsample``."""

    def __init__(self, block: List[nn.Module], attn: List[nn.Module], upsample: Optional[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)
        if upsample is not None:
            self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class VQGANDecoder(nn.Module):
    """taming's ``Decoder`` (same module tree and state-dict names), configured by a ddconfig.

    ``conv_in`` (z_channels -> ch * ch_mult[-1]), ``mid`` (block, attention, block), then from the
    lowest resolution up: ``num_res_blocks + 1`` ResnetBlocks per level (attention after each at
    the nominal resolutions in ``attn_resolutions``) and a nearest 2x ``Upsample`` + 3x3 conv
    between levels; ``up.0`` is the full-resolution level, as in taming's state dict. Then
    ``norm_out``, swish and ``conv_out`` to ``out_ch`` channels (images in about [-1, 1]).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        tanh_out: bool = False,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.tanh_out = bool(tanh_out)
        attn_resolutions = {int(r) for r in attn_resolutions}
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout)
        levels: List[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            upsample = None
            if i_level != 0:
                upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, _UpLevel(blocks, attns, upsample))  # up.0 = full resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        h = self.conv_out(_swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class GumbelQuantizeLogits(nn.Module):
    """The parameters of taming's ``GumbelQuantize``: ``proj`` (1x1 conv to the code logits) and
    ``embed`` (the codebook: unused for logits, used by ``decode``)."""

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int):
        super().__init__()
        self.n_embed = n_embed
        self.embedding_dim = embedding_dim
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


class EMAEmbedding(nn.Module):
    """taming's ``EmbeddingEMA`` state: ``weight`` (the codebook, V x D) and the EMA statistics
    ``cluster_size`` / ``embed_avg`` (kept so the state dict loads strictly; unused here)."""

    def __init__(self, n_embed: int, embedding_dim: int):
        super().__init__()
        weight = torch.randn(n_embed, embedding_dim)
        self.weight = nn.Parameter(weight)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", weight.clone())


class EMAQuantizeDistances(nn.Module):
    """taming's ``EMAVectorQuantizer`` as logits: the NEGATIVE squared distances to every code.

    ``forward(z (B,D,h,w)) -> (B,V,h,w)`` with ``-(|z|^2 + |e_v|^2 - 2 z.e_v)``: the argmax over V is
    the nearest code, the one taming's quantizer picks (``argmin`` of the distances). Computed in
    float32 even under autocast: the expansion subtracts large, nearly equal terms.
    """

    def __init__(self, n_embed: int, embedding_dim: int):
        super().__init__()
        self.n_embed = n_embed
        self.embedding_dim = embedding_dim
        self.embedding = EMAEmbedding(n_embed, embedding_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float().reshape(b, d, h * w)  # (B, D, hw)
            codes = self.embedding.weight.float()  # (V, D)
            z_sq = z.pow(2).sum(dim=1, keepdim=True)  # (B, 1, hw)
            e_sq = codes.pow(2).sum(dim=1).view(1, -1, 1)  # (1, V, 1)
            dist = z_sq + e_sq - 2.0 * torch.matmul(codes, z)  # (B, V, hw)
        return dist.neg_().view(b, self.n_embed, h, w)


def _check_vanilla_attention(ddconfig: Mapping[str, Any]) -> None:
    for key in ("use_linear_attn", "attn_type"):
        if ddconfig.get(key) not in (None, False, "vanilla"):
            raise ValueError(f"VQGAN ddconfig {key}={ddconfig[key]!r}: only taming's vanilla attention is supported")


def encoder_kwargs(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = set(ddconfig) - _ENCODER_KEYS - _DECODER_ONLY_KEYS
    if unknown:
        logger.debug("VQGAN ddconfig keys ignored by the encoder: %s", sorted(unknown))
    _check_vanilla_attention(ddconfig)
    missing = {"ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels"} - set(ddconfig)
    if missing:
        raise ValueError(f"VQGAN ddconfig lacks required keys {sorted(missing)}; got {dict(ddconfig)}")
    kwargs = {k: ddconfig[k] for k in _ENCODER_KEYS if k in ddconfig}
    kwargs["ch_mult"] = tuple(int(m) for m in kwargs.get("ch_mult", (1, 2, 4, 8)))
    kwargs["attn_resolutions"] = [int(r) for r in kwargs["attn_resolutions"]]
    kwargs["double_z"] = bool(kwargs.get("double_z", True))
    return kwargs


def decoder_kwargs(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
    if "out_ch" not in ddconfig:
        raise ValueError(f"VQGAN ddconfig lacks 'out_ch', needed to build the decoder; got {dict(ddconfig)}")
    if ddconfig.get("give_pre_end", False):
        raise ValueError("VQGAN ddconfig has give_pre_end: true; its decoder returns features, not images")
    kwargs = {k: ddconfig[k] for k in ("ch", "out_ch", "num_res_blocks", "resolution", "z_channels")}
    kwargs.update(
        ch_mult=tuple(int(m) for m in ddconfig.get("ch_mult", (1, 2, 4, 8))),
        attn_resolutions=[int(r) for r in ddconfig["attn_resolutions"]],
        dropout=float(ddconfig.get("dropout", 0.0)),
        resamp_with_conv=bool(ddconfig.get("resamp_with_conv", True)),
        tanh_out=bool(ddconfig.get("tanh_out", False)),
    )
    return kwargs
