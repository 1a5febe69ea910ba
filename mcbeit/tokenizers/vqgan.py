"""VQGAN (taming-transformers) tokenizers: Gumbel (``vqgan``) and EMA vector-quantised (``vqgan_ema``).

mc-BEiT's ``vqgan_gumbel_f8_8192`` tokenizer computes its logits as
``quantize.proj(quant_conv(encoder(x)))`` on inputs normalised by ``(x - 0.5) / 0.5``; the EMA
variant's logits are the negative squared distances of ``quant_conv(encoder(x))`` to its codes.
The module trees here reproduce taming's ``GumbelVQ`` / ``EMAVQ`` state-dict names
(``encoder.*``, ``quant_conv.*``, ``quantize.*``, and ``post_quant_conv.*`` + ``decoder.*`` when
the checkpoint holds them), so a released ``last.ckpt`` loads into them exactly; the training
loss is never built.

Architecture of taming's ``Encoder`` (temb-free): ``conv_in`` (3x3), per resolution level
``num_res_blocks`` ResnetBlocks (GroupNorm(32, eps 1e-6) + swish + 3x3 conv, twice; 1x1
``nin_shortcut`` when the width changes), an AttnBlock after each block at the levels whose
nominal resolution (``resolution`` halved per level) is in ``attn_resolutions``, a stride-2 3x3
``Downsample`` with asymmetric (0, 1, 0, 1) zero padding between levels; then
``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``, swish and ``conv_out``. The
``Decoder`` mirrors it (see :class:`VQGANDecoder`).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.models.checkpoint import compare_state_dict

from .base import Normalize, Tokenizer
from .dalle import _check_ids

logger = logging.getLogger(__name__)

#: mc-BEiT's tokenizer: taming's ``vqgan_gumbel_f8_8192`` (ImageNet, f8, 8192 codes).
VQGAN_GUMBEL_F8_DDCONFIG: Dict[str, Any] = dict(
    double_z=False,
    z_channels=256,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 1, 2, 4],
    num_res_blocks=2,
    attn_resolutions=[32],
    dropout=0.0,
)
VQGAN_GUMBEL_F8_N_EMBED = 8192
VQGAN_GUMBEL_F8_EMBED_DIM = 256

#: ddconfig keys the encoder understands; the others (out_ch, give_pre_end, ...) are decoder-only.
_ENCODER_KEYS = {
    "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
    "in_channels", "resolution", "z_channels", "double_z",
}
_DECODER_ONLY_KEYS = {"out_ch", "give_pre_end", "tanh_out", "use_linear_attn", "attn_type"}

#: state-dict prefixes of the modules always built (the logits), of the optional decoder, and of
#: the training loss (never built).
ENCODER_PREFIXES: Tuple[str, ...] = ("encoder.", "quant_conv.", "quantize.")
DECODER_PREFIXES: Tuple[str, ...] = ("decoder.", "post_quant_conv.")
SKIPPED_PREFIXES: Tuple[str, ...] = DECODER_PREFIXES + ("loss.",)


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


def _encoder_kwargs(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
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


def _decoder_kwargs(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
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


class TamingVQGANTokenizer(Tokenizer):
    """Common part of taming's VQGAN tokenizers: ``encoder`` + ``quant_conv`` + ``quantize`` (the
    logits), and optionally ``post_quant_conv`` + ``decoder`` (for :meth:`decode`).

    Input: images normalised by ``(x - 0.5) / 0.5`` (values in [-1, 1]). Subclasses set
    ``model_target`` (the class name of taming's model in ``model.yaml``) and build ``quantize``.
    """

    kind = "abstract-vqgan"
    model_target = "?"

    def __init__(
        self,
        ddconfig: Optional[Mapping[str, Any]] = None,
        n_embed: int = VQGAN_GUMBEL_F8_N_EMBED,
        embed_dim: int = VQGAN_GUMBEL_F8_EMBED_DIM,
        image_size: int = 112,
        input_transform=None,
        with_decoder: bool = False,
    ):
        ddconfig = dict(copy.deepcopy(VQGAN_GUMBEL_F8_DDCONFIG if ddconfig is None else ddconfig))
        kwargs = _encoder_kwargs(ddconfig)
        if kwargs["double_z"]:
            raise ValueError(
                f"VQGAN ddconfig has double_z: true; taming's {self.model_target} feeds the encoder output "
                "(2*z_channels wide) into quant_conv (z_channels wide), so only double_z: false is valid"
            )
        z_channels = int(kwargs["z_channels"])
        self._check_dims(z_channels, int(embed_dim))
        if input_transform is None:
            input_transform = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        super().__init__(
            vocab_size=n_embed,
            downsample=2 ** (len(kwargs["ch_mult"]) - 1),
            image_size=image_size,
            input_transform=input_transform,
            in_channels=int(kwargs["in_channels"]),
        )
        self.ddconfig = ddconfig
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.z_channels = z_channels
        self.encoder = VQGANEncoder(**kwargs)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = self._build_quantize()
        self.register_module("post_quant_conv", None)
        self.register_module("decoder", None)
        if with_decoder:
            self.build_decoder()

    # ------------------------------------------------------------------ subclass hooks
    def _check_dims(self, z_channels: int, embed_dim: int) -> None:
        """Refuse (z_channels, embed_dim) pairs the taming model cannot have."""

    def _build_quantize(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _convert_state_dict(self, state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        """Rename keys of older layouts of the same model (none by default)."""
        return state_dict

    # ------------------------------------------------------------------ forward
    @property
    def config(self) -> Dict[str, Any]:
        return dict(ddconfig=copy.deepcopy(self.ddconfig), n_embed=self.n_embed, embed_dim=self.embed_dim)

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.quant_conv.weight.dtype)
        return self.quantize(self.quant_conv(self.encoder(images)))

    # ------------------------------------------------------------------ decoding (inspection)
    def build_decoder(self) -> None:
        """Add taming's ``post_quant_conv`` (embed_dim -> z_channels) and ``decoder`` (random weights)."""
        self.post_quant_conv = nn.Conv2d(self.embed_dim, self.z_channels, 1)
        self.decoder = VQGANDecoder(**_decoder_kwargs(self.ddconfig))
        self.post_quant_conv.to(self.quant_conv.weight)
        self.decoder.to(self.quant_conv.weight)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B,h,w) -> images (B,3,8h,8w) in [0,1]: ``decoder(post_quant_conv(codebook[ids]))``
        mapped from [-1, 1] by ``(x + 1) / 2`` and clamped."""
        if self.decoder is None:
            return super().decode(ids)
        ids = _check_ids(ids, self.n_embed)
        quant = F.embedding(ids, self.quantize.codebook).permute(0, 3, 1, 2)  # (B, D, h, w)
        images = self.decoder(self.post_quant_conv(quant)).float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path, image_size: int = 112, load_decoder: Optional[bool] = None) -> "TamingVQGANTokenizer":
        """Build from a taming log folder holding ``model.yaml`` and ``last.ckpt``.

        Both files may sit in the folder itself (mc-BEiT's layout) or in taming's ``configs/`` and
        ``checkpoints/`` (or ``ckpts/``) sub-folders; ``path`` may also be the ``.ckpt`` file itself.
        Every parameter of the modules built here must be in the checkpoint (a missing key is an
        error naming it). ``load_decoder``: None builds ``post_quant_conv`` + ``decoder`` when the
        checkpoint holds their weights (released files do), True requires them, False skips them
        (their keys are dropped, as are the training loss's).
        """
        path = Path(path)
        if path.is_file():
            ckpt_path = path
            folder = path.parent.parent if path.parent.name in ("checkpoints", "ckpts") else path.parent
        else:
            folder = path
            if not folder.is_dir():
                raise FileNotFoundError(f"VQGAN weight folder {folder} does not exist (expected model.yaml and last.ckpt in it)")
            ckpt_path = None
        yaml_path = _find_in(folder, "model.yaml", ("configs",))
        if ckpt_path is None:
            ckpt_path = _find_in(folder, "last.ckpt", ("checkpoints", "ckpts"))
        params = read_model_yaml(yaml_path, target=cls.model_target)
        state_dict = load_lightning_state_dict(ckpt_path)
        has_decoder_keys = any(k.startswith(DECODER_PREFIXES) for k in state_dict)
        if load_decoder and not has_decoder_keys:
            raise ValueError(f"VQGAN checkpoint {ckpt_path} holds no decoder weights (no {' / '.join(DECODER_PREFIXES)} keys)")
        with_decoder = has_decoder_keys if load_decoder is None else bool(load_decoder)
        tokenizer = cls(
            ddconfig=params["ddconfig"],
            n_embed=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            image_size=image_size,
            with_decoder=with_decoder,
        )
        tokenizer.load_taming_state_dict(state_dict, source=str(ckpt_path))
        if not with_decoder:
            logger.info("VQGAN %s: encoder only (%s): decode() is unavailable", ckpt_path,
                        "decoder not requested" if has_decoder_keys else "the checkpoint holds no decoder weights")
        return tokenizer

    def load_taming_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the entries of a taming state dict that belong to the modules built here.

        Raises a ValueError naming missing keys, unexpected keys under our modules and shape
        mismatches; keys of the modules not built (``loss``; ``decoder`` / ``post_quant_conv``
        without a decoder) are dropped (counted in a debug log); keys with other prefixes are
        ignored with a warning.
        """
        used = ENCODER_PREFIXES + (DECODER_PREFIXES if self.has_decoder else ())
        ours: Dict[str, torch.Tensor] = {}
        skipped: Dict[str, int] = {}
        foreign: List[str] = []
        for key, value in state_dict.items():
            if key.startswith(used):
                ours[key] = value
            elif key.startswith(SKIPPED_PREFIXES):
                prefix = key.split(".", 1)[0]
                skipped[prefix] = skipped.get(prefix, 0) + 1
            else:
                foreign.append(key)
        ours = self._convert_state_dict(ours, source)
        if skipped:
            logger.debug(
                "VQGAN %s: dropped %d keys of modules not built (%s)",
                source, sum(skipped.values()), ", ".join(f"{k}: {n}" for k, n in sorted(skipped.items())),
            )
        if foreign:
            logger.warning("VQGAN %s: ignoring %d keys of unknown modules: %s", source, len(foreign), _preview(foreign))

        report = compare_state_dict(self, ours)
        missing, unexpected = report.missing, report.unexpected
        mismatched = [f"{k}: checkpoint {ck} vs model {md}" for k, ck, md in report.mismatched]
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            built = "/".join(p.rstrip(".") for p in used)
            problems.append(f"unexpected keys for the {built} modules ({len(unexpected)}): {_preview(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
        if problems:
            raise ValueError(
                f"VQGAN checkpoint {source} does not match the {self.model_target} described by its model.yaml: "
                + "; ".join(problems)
            )
        self.load_state_dict(ours, strict=True)
        self.random_weights = False


class GumbelVQGANTokenizer(TamingVQGANTokenizer):
    """taming's Gumbel VQGAN (``GumbelVQ``) up to the code logits: ``quantize.proj(quant_conv(encoder(x)))``."""

    kind = "vqgan"
    model_target = "GumbelVQ"

    def _check_dims(self, z_channels: int, embed_dim: int) -> None:
        if embed_dim != z_channels:
            raise ValueError(
                f"embed_dim ({embed_dim}) must equal ddconfig z_channels ({z_channels}): taming's GumbelVQ "
                "builds quantize.proj with z_channels inputs and feeds it quant_conv's embed_dim outputs"
            )

    def _build_quantize(self) -> nn.Module:
        return GumbelQuantizeLogits(self.z_channels, self.embed_dim, self.n_embed)


class EMAVQGANTokenizer(TamingVQGANTokenizer):
    """taming's ``EMAVQ`` (VQGAN with an EMA-updated codebook) as a tokenizer.

    Logits: ``-|quant_conv(encoder(x)) - e_v|^2`` for every code ``e_v`` (see
    :class:`EMAQuantizeDistances`), so the argmax is the code taming's quantizer picks.
    The codebook is ``quantize.embedding.weight`` (taming's layout since Sep 2021, with
    ``quantize.embedding.cluster_size`` / ``embed_avg``); checkpoints of the Aug 2021 layout
    (``quantize.cluster_size`` / ``quantize.embed_avg`` beside an ``nn.Embedding``) load too.
    """

    kind = "vqgan_ema"
    model_target = "EMAVQ"

    def _build_quantize(self) -> nn.Module:
        return EMAQuantizeDistances(self.n_embed, self.embed_dim)

    def _convert_state_dict(self, state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        renamed = {f"quantize.{name}": f"quantize.embedding.{name}" for name in ("cluster_size", "embed_avg")}
        old = [k for k in renamed if k in state_dict and renamed[k] not in state_dict]
        if old:
            logger.info("VQGAN %s: EMA statistics in the Aug 2021 layout (%s): renamed under quantize.embedding.",
                        source, ", ".join(old))
            state_dict = {renamed.get(k, k) if k in old else k: v for k, v in state_dict.items()}
        return state_dict


def _find_in(folder: Path, name: str, subfolders: Sequence[str]) -> Path:
    candidates = [folder / name] + [folder / sub / name for sub in subfolders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"VQGAN weight folder {folder} lacks {name} (looked for {', '.join(str(c) for c in candidates)}); "
        "expected model.yaml and last.ckpt"
    )


def _preview(items: Sequence[str], limit: int = 20) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f", ... (+{len(items) - limit} more)"
    return text


#: taming model class (``model.target`` in model.yaml) -> the tokenizer kind that reads it
TAMING_TARGET_KINDS: Dict[str, str] = {"GumbelVQ": "vqgan", "EMAVQ": "vqgan_ema"}


def read_model_yaml(path, target: str = "GumbelVQ") -> Dict[str, Any]:
    """``model.params`` of a taming ``model.yaml`` (safe YAML), checked for the model class ``target``."""
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    try:
        model = config["model"]
        params = model["params"]
    except (TypeError, KeyError):
        raise ValueError(f"{path}: expected a taming config with model.params, got top-level keys "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}") from None
    found = model.get("target")
    if found is not None and str(found).rsplit(".", 1)[-1] != target:
        short = str(found).rsplit(".", 1)[-1]
        hint = (f"use --discrete_vae_type {TAMING_TARGET_KINDS[short]} for it" if short in TAMING_TARGET_KINDS
                else f"supported taming models: {', '.join(f'{t} ({k})' for t, k in TAMING_TARGET_KINDS.items())}")
        raise ValueError(
            f"{path}: model.target is {found!r}, but the {TAMING_TARGET_KINDS.get(target, target)!r} tokenizer reads "
            f"taming's {target}; {hint}"
        )
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise ValueError(f"{path}: model.params lacks {key!r}")
    if params.get("remap") is not None:
        raise ValueError(f"{path}: {target} with remap={params['remap']!r} is not supported (index remapping)")
    return params


#: Globals that PyTorch-Lightning 1.x pickles into checkpoint metadata (callback states are keyed
#: by the callback *class* there). They are mapped to an inert placeholder so that
#: ``torch.load(weights_only=True)`` can read the file; nothing of theirs is imported or run.
LIGHTNING_METADATA_GLOBALS: Tuple[str, ...] = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_logger.LearningRateLogger",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.progress.ProgressBar",
    "pytorch_lightning.callbacks.gpu_stats_monitor.GPUStatsMonitor",
)


class LightningMetadataPlaceholder:
    """Stands in for a Lightning class named in checkpoint metadata; accepts and keeps state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _placeholder_globals():
    entries = []
    for name in LIGHTNING_METADATA_GLOBALS:
        placeholder = type(name.rsplit(".", 1)[-1], (LightningMetadataPlaceholder,), {"__module__": __name__})
        entries.append((placeholder, name))
    return entries


def load_lightning_state_dict(path) -> Dict[str, torch.Tensor]:
    """``state_dict`` of a PyTorch-Lightning checkpoint, read with ``torch.load(weights_only=True)``.

    Known Lightning metadata classes are mapped to inert placeholders; any other global the file
    names is refused (never falls back to full unpickling) with an error that names it.
    """
    import pickle

    path = os.fspath(path)
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5 (name-mapped allow-list)
            with torch.serialization.safe_globals(_placeholder_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:  # pragma: no cover - older torch: plain weights_only
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} could not be read safely: torch.load(weights_only=True) refused it. PyTorch's "
            f"message (it names the refused global) follows.\nmcbeit never unpickles arbitrary objects; if the "
            f"file is trusted, re-save just its weights, e.g. torch.save({{'state_dict': ckpt['state_dict']}}, "
            f"'last.ckpt'), and retry.\n{err}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: no tensor 'state_dict' found (top-level keys: {sorted(map(str, checkpoint))})")
    return state_dict
