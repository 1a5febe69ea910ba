"""Frozen visual tokenizers: image (B,3,H,W) -> logits (B,V,H/8,W/8).

``build_tokenizer(kind, weight_path=None, image_size=112, load_decoder=None)`` makes one of
``TOKENIZER_KINDS`` (``dall-e``, ``vqgan`` a.k.a. ``vqgan_gumbel_f8_8192``, ``customized``,
``vqgan_ema``, ``vqkd``: BEiT v2's VQ-KD, f16); each carries its own picklable ``input_transform`` for the data pipeline, and
``decode(ids)`` where a decoder was loaded.
"""

from .base import MapPixels, Normalize, Tokenizer
from .custom import CustomTokenizer, load_custom_tokenizer, save_custom_tokenizer
from .dalle import DallEDecoder, DallEEncoder, unmap_pixels
from .factory import TOKENIZER_ALIASES, TOKENIZER_KINDS, build_tokenizer, canonical_kind
from .safe_pickle import load_dalle_decoder, load_dalle_encoder
from .taming_modules import VQGANDecoder, VQGANEncoder
from .vqgan import EMAVQGANTokenizer, GumbelVQGANTokenizer, TamingVQGANTokenizer
from .vqkd import VQKD, VQKD_LOGIT_SCALE, VQKDTokenizer, build_vqkd_tokenizer, parse_vqkd_name

__all__ = [
    "Tokenizer",
    "build_tokenizer",
    "TOKENIZER_KINDS",
    "TOKENIZER_ALIASES",
    "canonical_kind",
    "MapPixels",
    "Normalize",
    "DallEEncoder",
    "GumbelVQGANTokenizer",
    "VQGANEncoder",
    "DallEDecoder",
    "unmap_pixels",
    "load_dalle_encoder",
    "load_dalle_decoder",
    "TamingVQGANTokenizer",
    "EMAVQGANTokenizer",
    "VQGANDecoder",
    "CustomTokenizer",
    "save_custom_tokenizer",
    "load_custom_tokenizer",
    "VQKD",
    "VQKDTokenizer",
    "VQKD_LOGIT_SCALE",
    "build_vqkd_tokenizer",
    "parse_vqkd_name",
]
