"""VQGAN (taming-transformers) Gumbel tokenizer: encoder + quant_conv + quantize.proj.

mc-BEiT's ``vqgan_gumbel_f8_8192`` tokenizer computes its logits as
``quantize.proj(quant_conv(encoder(x)))`` on inputs normalised by ``(x - 0.5) / 0.5``.
The module tree here reproduces taming's ``GumbelVQ`` state-dict names for the parts we use
(``encoder.*``, ``quant_conv.*``, ``quantize.proj.*``, ``quantize.embed.weight``), so a released
``last.ckpt`` loads into it exactly; the decoder, ``post_quant_conv`` and the training loss are
not built.

Architecture of taming's ``Encoder`` (temb-free): ``conv_in`` (3x3), per resolution level
``num_res_blocks`` ResnetBlocks (GroupNorm(32, eps 1e-6) + swish + 3x3 conv, twice; 1x1
``nin_shortcut`` when the width changes), an AttnBlock after each block at the levels whose
nominal resolution (``resolution`` halved per level) is in ``attn_resolutions``, a stride-2 3x3
``Downsample`` with asymmetric (0, 1, 0, 1) zero padding between levels; then
``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``, swish and ``conv_out``.
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

#: state-dict prefixes of the modules built here, and of the GumbelVQ modules we deliberately skip.
USED_PREFIXES: Tuple[str, ...] = ("encoder.", "quant_conv.", "quantize.")
SKIPPED_PREFIXES: Tuple[str, ...] = ("decoder.", "post_quant_conv.", "loss.")


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


class GumbelQuantizeLogits(nn.Module):
    """The parameters of taming's ``GumbelQuantize``: ``proj`` (1x1 conv to the code logits) and
    ``embed`` (the codebook, kept so the released state dict loads; unused for logits)."""

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int):
        super().__init__()
        self.n_embed = n_embed
        self.embedding_dim = embedding_dim
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


def _encoder_kwargs(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = set(ddconfig) - _ENCODER_KEYS - _DECODER_ONLY_KEYS
    if unknown:
        logger.debug("VQGAN ddconfig keys ignored by the encoder: %s", sorted(unknown))
    missing = {"ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels"} - set(ddconfig)
    if missing:
        raise ValueError(f"VQGAN ddconfig lacks required keys {sorted(missing)}; got {dict(ddconfig)}")
    kwargs = {k: ddconfig[k] for k in _ENCODER_KEYS if k in ddconfig}
    kwargs["ch_mult"] = tuple(int(m) for m in kwargs.get("ch_mult", (1, 2, 4, 8)))
    kwargs["attn_resolutions"] = [int(r) for r in kwargs["attn_resolutions"]]
    kwargs["double_z"] = bool(kwargs.get("double_z", True))
    return kwargs


class GumbelVQGANTokenizer(Tokenizer):
    """taming's Gumbel VQGAN up to the code logits: ``quantize.proj(quant_conv(encoder(x)))``.

    Input: images normalised by ``(x - 0.5) / 0.5`` (values in [-1, 1]).
    """

    kind = "vqgan"

    def __init__(
        self,
        ddconfig: Optional[Mapping[str, Any]] = None,
        n_embed: int = VQGAN_GUMBEL_F8_N_EMBED,
        embed_dim: int = VQGAN_GUMBEL_F8_EMBED_DIM,
        image_size: int = 112,
        input_transform=None,
    ):
        ddconfig = dict(copy.deepcopy(VQGAN_GUMBEL_F8_DDCONFIG if ddconfig is None else ddconfig))
        kwargs = _encoder_kwargs(ddconfig)
        if kwargs["double_z"]:
            raise ValueError(
                "VQGAN ddconfig has double_z: true; taming's GumbelVQ feeds the encoder output "
                "(2*z_channels wide) into quant_conv (z_channels wide), so only double_z: false is valid"
            )
        z_channels = int(kwargs["z_channels"])
        if int(embed_dim) != z_channels:
            raise ValueError(
                f"embed_dim ({embed_dim}) must equal ddconfig z_channels ({z_channels}): taming's GumbelVQ "
                "builds quantize.proj with z_channels inputs and feeds it quant_conv's embed_dim outputs"
            )
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
        self.encoder = VQGANEncoder(**kwargs)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = GumbelQuantizeLogits(z_channels, embed_dim, n_embed)

    @property
    def config(self) -> Dict[str, Any]:
        return dict(ddconfig=copy.deepcopy(self.ddconfig), n_embed=self.n_embed, embed_dim=self.embed_dim)

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.quant_conv.weight.dtype)
        return self.quantize(self.quant_conv(self.encoder(images)))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path, image_size: int = 112) -> "GumbelVQGANTokenizer":
        """Build from a taming log folder holding ``model.yaml`` and ``last.ckpt``.

        Both files may sit in the folder itself (mc-BEiT's layout) or in taming's ``configs/`` and
        ``checkpoints/`` (or ``ckpts/``) sub-folders; ``path`` may also be the ``.ckpt`` file itself.
        Every parameter of the modules built here must be in the checkpoint (a missing key is an
        error naming it); keys of the modules not built (decoder, post_quant_conv, loss) are dropped.
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
        params = read_model_yaml(yaml_path)
        tokenizer = cls(
            ddconfig=params["ddconfig"],
            n_embed=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            image_size=image_size,
        )
        state_dict = load_lightning_state_dict(ckpt_path)
        tokenizer.load_taming_state_dict(state_dict, source=str(ckpt_path))
        return tokenizer

    def load_taming_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the ``encoder.`` / ``quant_conv.`` / ``quantize.`` entries of a GumbelVQ state dict.

        Raises a ValueError naming missing keys, unexpected keys under our modules and shape
        mismatches; keys of the skipped modules are dropped (counted in a debug log); keys with
        other prefixes are ignored with a warning.
        """
        ours: Dict[str, torch.Tensor] = {}
        skipped: Dict[str, int] = {}
        foreign: List[str] = []
        for key, value in state_dict.items():
            if key.startswith(USED_PREFIXES):
                ours[key] = value
            elif key.startswith(SKIPPED_PREFIXES):
                prefix = key.split(".", 1)[0]
                skipped[prefix] = skipped.get(prefix, 0) + 1
            else:
                foreign.append(key)
        if skipped:
            logger.debug(
                "VQGAN %s: dropped %d keys of modules not needed for logits (%s)",
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
            problems.append(f"unexpected keys for the encoder/quant_conv/quantize ({len(unexpected)}): {_preview(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
        if problems:
            raise ValueError(
                f"VQGAN checkpoint {source} does not match the model described by its model.yaml: " + "; ".join(problems)
            )
        self.load_state_dict(ours, strict=True)
        self.random_weights = False


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


def read_model_yaml(path) -> Dict[str, Any]:
    """``model.params`` of a taming ``model.yaml`` (safe YAML), checked for a Gumbel VQGAN."""
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    try:
        model = config["model"]
        params = model["params"]
    except (TypeError, KeyError):
        raise ValueError(f"{path}: expected a taming config with model.params, got top-level keys "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}") from None
    target = model.get("target")
    if target is not None and not str(target).endswith("GumbelVQ"):
        raise ValueError(
            f"{path}: model.target is {target!r}; only taming's GumbelVQ (vqgan_gumbel_f8_8192) is supported "
            "as the 'vqgan' tokenizer (its logits come from GumbelQuantize.proj)"
        )
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise ValueError(f"{path}: model.params lacks {key!r}")
    if params.get("remap") is not None:
        raise ValueError(f"{path}: GumbelVQ with remap={params['remap']!r} is not supported (index remapping)")
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
