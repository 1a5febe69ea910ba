"""VQGAN (taming-transformers) tokenizers: Gumbel (``vqgan``) and EMA vector-quantised (``vqgan_ema``).

mc-BEiT's ``vqgan_gumbel_f8_8192`` tokenizer computes its logits as
``quantize.proj(quant_conv(encoder(x)))`` on inputs normalised by ``(x - 0.5) / 0.5``; the EMA
variant's logits are the negative squared distances of ``quant_conv(encoder(x))`` to its codes.
The module trees here reproduce taming's ``GumbelVQ`` / ``EMAVQ`` state-dict names
(``encoder.*``, ``quant_conv.*``, ``quantize.*``, and ``post_quant_conv.*`` + ``decoder.*`` when
the checkpoint holds them), so a released ``last.ckpt`` loads into them exactly; the training
loss is never built.

The modules themselves (encoder, decoder, quantizers) are in :mod:`mcbeit.tokenizers.taming_modules`;
reading the log folder safely is :mod:`mcbeit.tokenizers.taming_files`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mcbeit.models.checkpoint import compare_state_dict

from .base import Normalize, Tokenizer, check_token_ids
from .taming_files import find_log_file, load_lightning_state_dict, preview_keys, read_model_yaml
from .taming_modules import (EMAQuantizeDistances, GumbelQuantizeLogits, VQGANDecoder, VQGANEncoder, decoder_kwargs,
                             encoder_kwargs)

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

#: state-dict prefixes of the modules always built (the logits), of the optional decoder, and of
#: the training loss (never built).
ENCODER_PREFIXES: Tuple[str, ...] = ("encoder.", "quant_conv.", "quantize.")
DECODER_PREFIXES: Tuple[str, ...] = ("decoder.", "post_quant_conv.")
SKIPPED_PREFIXES: Tuple[str, ...] = DECODER_PREFIXES + ("loss.",)


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
        kwargs = encoder_kwargs(ddconfig)
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
        self.decoder = VQGANDecoder(**decoder_kwargs(self.ddconfig))
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
        ids = check_token_ids(ids, self.n_embed)
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
        yaml_path = find_log_file(folder, "model.yaml", ("configs",))
        if ckpt_path is None:
            ckpt_path = find_log_file(folder, "last.ckpt", ("checkpoints", "ckpts"))
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
            logger.warning("VQGAN %s: ignoring %d keys of unknown modules: %s", source, len(foreign), preview_keys(foreign))

        report = compare_state_dict(self, ours)
        missing, unexpected = report.missing, report.unexpected
        mismatched = [f"{k}: checkpoint {ck} vs model {md}" for k, ck, md in report.mismatched]
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {preview_keys(missing)}")
        if unexpected:
            built = "/".join(p.rstrip(".") for p in used)
            problems.append(f"unexpected keys for the {built} modules ({len(unexpected)}): {preview_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {preview_keys(mismatched)}")
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
