"""``build_tokenizer(kind, weight_path, image_size)``: the one way the package makes a tokenizer."""

from __future__ import annotations

import logging
import os
from typing import Optional

from .base import Tokenizer
from .custom import RANDOM_COSINE_SCALE, CustomTokenizer, load_custom_tokenizer
from .dalle import DallEEncoder
from .safe_pickle import load_dalle_decoder, load_dalle_encoder
from .vqgan import EMAVQGANTokenizer, GumbelVQGANTokenizer
from .vqkd import build_vqkd_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("dall-e", "vqgan", "customized", "vqgan_ema", "vqkd")
TOKENIZER_ALIASES = {"vqgan_gumbel_f8_8192": "vqgan"}

_WEIGHT_HINTS = {
    "dall-e": "a folder holding OpenAI's encoder.pkl, and decoder.pkl to look at tokens (read by a restricted unpickler)",
    "vqgan": "a taming log folder holding model.yaml and last.ckpt (vqgan_gumbel_f8_8192)",
    "vqgan_ema": "a taming log folder holding model.yaml (target taming.models.vqgan.EMAVQ) and last.ckpt",
    "customized": ("a checkpoint of `mcbeit-tokenizer train` (checkpoint-<epoch>.pth), the tokenizer.pth beside it, "
                   "their folder, or a .pth written by mcbeit.tokenizers.save_custom_tokenizer"),
    "vqkd": ("a BEiT v2 VQ-KD file: unilm's vqkd_encoder_base_decoder_*.pth, mmpretrain's vqkd_encoder.pth or a "
             "checkpoint-<epoch>.pth of mcbeit-vqkd"),
}
_VQGAN_CLASSES = {"vqgan": GumbelVQGANTokenizer, "vqgan_ema": EMAVQGANTokenizer}


def canonical_kind(kind: str) -> str:
    """Map a kind or alias (``vqgan_gumbel_f8_8192``) to one of :data:`TOKENIZER_KINDS`."""
    name = str(kind).strip().lower()
    name = TOKENIZER_ALIASES.get(name, name)
    if name not in TOKENIZER_KINDS:
        known = ", ".join(TOKENIZER_KINDS + tuple(TOKENIZER_ALIASES))
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of: {known}")
    return name


def build_tokenizer(
    kind: str, weight_path: Optional[str] = None, image_size: int = 112, *, load_decoder: Optional[bool] = None
) -> Tokenizer:
    """A frozen tokenizer (eval mode, no gradients) of ``kind`` for ``image_size`` inputs.

    ``weight_path`` None gives random weights (``random_weights=True``) and a loud warning, and no
    decoder. ``load_decoder`` (dall-e, vqgan, vqgan_ema): None loads the decoder when its weights are
    there (``decoder.pkl`` beside ``encoder.pkl``; decoder keys in ``last.ckpt``), True requires
    it, False never builds it (pre-training only needs the logits: saves its memory and load time).
    """
    name = canonical_kind(kind)
    if name == "vqkd":  # random weights warn there (the tiny encoder); a file's codebook size is the file's
        return build_vqkd_tokenizer(weight_path, image_size, codebook_size=None, codebook_dim=None)
    if weight_path is None or os.fspath(weight_path) == "":
        if load_decoder:
            raise ValueError(f"load_decoder=True needs the weights of a trained {kind!r} tokenizer (weight_path)")
        tokenizer = _random_tokenizer(name, image_size)
        tokenizer.random_weights = True
        logger.warning(
            "Tokenizer %r has RANDOM weights: its targets carry no visual meaning (fine for tests and smoke "
            "runs, useless for real pre-training). Pass real weights with --discrete_vae_weight_path "
            "(weight_path=): %s.",
            kind, _WEIGHT_HINTS[name],
        )
    elif name in _VQGAN_CLASSES:
        tokenizer = _VQGAN_CLASSES[name].from_folder(weight_path, image_size=image_size, load_decoder=load_decoder)
    elif name == "customized":
        tokenizer = load_custom_tokenizer(weight_path, image_size=image_size)
    else:
        tokenizer = _load_dalle(weight_path, image_size, load_decoder)
    if not tokenizer.random_weights:
        logger.info("Loaded %s tokenizer (%d words, f%d) from %s", name, tokenizer.vocab_size, tokenizer.downsample, weight_path)
    return tokenizer.freeze()


def _random_tokenizer(name: str, image_size: int) -> Tokenizer:
    if name == "dall-e":
        return DallEEncoder(image_size=image_size)
    if name in _VQGAN_CLASSES:
        return _VQGAN_CLASSES[name](image_size=image_size)
    return CustomTokenizer(image_size=image_size, cosine_scale=RANDOM_COSINE_SCALE)


def _load_dalle(weight_path, image_size: int, load_decoder: Optional[bool]) -> DallEEncoder:
    """OpenAI's encoder.pkl at ``weight_path`` (a folder or the file), with decoder.pkl from the same folder."""
    path = os.fspath(weight_path)
    pkl = os.path.join(path, "encoder.pkl") if os.path.isdir(path) else path
    if not os.path.isfile(pkl):
        raise FileNotFoundError(f"DALL-E weights: {pkl} does not exist (expected {_WEIGHT_HINTS['dall-e']})")
    encoder = load_dalle_encoder(pkl, image_size=image_size)
    decoder_pkl = os.path.join(os.path.dirname(pkl), "decoder.pkl")
    if load_decoder is False:
        return encoder
    if os.path.isfile(decoder_pkl):
        encoder.attach_decoder(load_dalle_decoder(decoder_pkl))
        logger.info("Loaded the DALL-E decoder from %s (decode() shows what tokens mean)", decoder_pkl)
    elif load_decoder:
        raise FileNotFoundError(f"DALL-E decoder requested but {decoder_pkl} does not exist")
    else:
        logger.info("No DALL-E decoder.pkl beside %s: encoder only, decode() is unavailable", pkl)
    return encoder
