"""``build_tokenizer(kind, weight_path, image_size)``: the one way the package makes a tokenizer."""

from __future__ import annotations

import logging
import os
from typing import Optional

from .base import Tokenizer
from .custom import RANDOM_COSINE_SCALE, CustomTokenizer, load_custom_tokenizer
from .dalle import DallEEncoder
from .safe_pickle import load_dalle_encoder
from .vqgan import GumbelVQGANTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("dall-e", "vqgan", "customized")
TOKENIZER_ALIASES = {"vqgan_gumbel_f8_8192": "vqgan"}

_WEIGHT_HINTS = {
    "dall-e": "a folder holding OpenAI's encoder.pkl (read by a restricted unpickler)",
    "vqgan": "a taming log folder holding model.yaml and last.ckpt (vqgan_gumbel_f8_8192)",
    "customized": "a .pth file written by mcbeit.tokenizers.save_custom_tokenizer",
}


def canonical_kind(kind: str) -> str:
    """Map a kind or alias (``vqgan_gumbel_f8_8192``) to one of :data:`TOKENIZER_KINDS`."""
    name = str(kind).strip().lower()
    name = TOKENIZER_ALIASES.get(name, name)
    if name not in TOKENIZER_KINDS:
        known = ", ".join(TOKENIZER_KINDS + tuple(TOKENIZER_ALIASES))
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of: {known}")
    return name


def build_tokenizer(kind: str, weight_path: Optional[str] = None, image_size: int = 112) -> Tokenizer:
    """A frozen tokenizer (eval mode, no gradients) of ``kind`` for ``image_size`` inputs.

    ``weight_path`` None gives random weights (``random_weights=True``) and a loud warning.
    """
    name = canonical_kind(kind)
    if weight_path is None or os.fspath(weight_path) == "":
        tokenizer = _random_tokenizer(name, image_size)
        tokenizer.random_weights = True
        logger.warning(
            "Tokenizer %r has RANDOM weights: its targets carry no visual meaning (fine for tests and smoke "
            "runs, useless for real pre-training). Pass real weights with --discrete_vae_weight_path "
            "(weight_path=): %s.",
            kind, _WEIGHT_HINTS[name],
        )
    elif name == "vqgan":
        tokenizer = GumbelVQGANTokenizer.from_folder(weight_path, image_size=image_size)
    elif name == "customized":
        tokenizer = load_custom_tokenizer(weight_path, image_size=image_size)
    else:
        tokenizer = _load_dalle(weight_path, image_size)
    if not tokenizer.random_weights:
        logger.info("Loaded %s tokenizer (%d words, f%d) from %s", name, tokenizer.vocab_size, tokenizer.downsample, weight_path)
    return tokenizer.freeze()


def _random_tokenizer(name: str, image_size: int) -> Tokenizer:
    if name == "dall-e":
        return DallEEncoder(image_size=image_size)
    if name == "vqgan":
        return GumbelVQGANTokenizer(image_size=image_size)
    return CustomTokenizer(image_size=image_size, cosine_scale=RANDOM_COSINE_SCALE)


def _load_dalle(weight_path, image_size: int) -> Tokenizer:
    path = os.fspath(weight_path)
    pkl = os.path.join(path, "encoder.pkl") if os.path.isdir(path) else path
    if not os.path.isfile(pkl):
        raise FileNotFoundError(f"DALL-E weights: {pkl} does not exist (expected {_WEIGHT_HINTS['dall-e']})")
    return load_dalle_encoder(pkl, image_size=image_size)
