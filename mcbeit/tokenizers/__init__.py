"""Frozen visual tokenizers: image (B,3,H,W) -> logits (B,V,H/8,W/8).

``build_tokenizer(kind, weight_path=None, image_size=112)`` makes one of
``TOKENIZER_KINDS`` (``dall-e``, ``vqgan`` a.k.a. ``vqgan_gumbel_f8_8192``, ``customized``);
each carries its own picklable ``input_transform`` for the data pipeline.
"""

from .base import MapPixels, Normalize, Tokenizer
from .custom import CustomTokenizer, load_custom_tokenizer, save_custom_tokenizer
from .dalle import DallEEncoder
from .factory import TOKENIZER_ALIASES, TOKENIZER_KINDS, build_tokenizer, canonical_kind
from .vqgan import GumbelVQGANTokenizer, VQGANEncoder

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
    "CustomTokenizer",
    "save_custom_tokenizer",
    "load_custom_tokenizer",
]
