"""The ``customized`` tokenizer: a small dVAE-style encoder of one's own.

It is the DALL-E encoder architecture at a small width (default: n_hid 16, one block per
group, 8192 words, f8; about 0.55 GFLOPs and 1.1 M parameters per 112 px image) with the
original's 'customized' input normalisation ``(x - 0.5) / 0.5``. Weights are stored as

    {'kind': 'customized', 'format_version': 1, 'config': {...}, 'state_dict': {...}}

written by :func:`save_custom_tokenizer` and read back with ``torch.load(weights_only=True)``
(by :func:`load_custom_tokenizer`, or ``build_tokenizer('customized', path)``).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from mcbeit.models.checkpoint import compare_state_dict

from .base import Normalize
from .dalle import DallEEncoder

CUSTOM_FORMAT_VERSION = 1
CUSTOM_DEFAULT_CONFIG: Dict[str, int] = dict(
    group_count=4, n_hid=16, n_blk_per_group=1, input_channels=3, vocab_size=8192
)
# Scale of the cosine head used when the tokenizer has random weights (see ``cosine_scale``).
RANDOM_COSINE_SCALE = 100.0
_CONFIG_KEYS = frozenset(CUSTOM_DEFAULT_CONFIG) | {"cosine_scale"}


class CustomTokenizer(DallEEncoder):
    """A small DALL-E-style encoder with (x - 0.5) / 0.5 input normalisation.

    ``cosine_scale`` > 0 replaces the output convolution's plain logits by
    ``cosine_scale * cos(centred features, output-conv row)``: a random-projection quantiser.
    With random weights the plain logits are nearly flat (softmax(L / 4) is almost uniform and
    the argmax collapses onto a handful of words), so the random tokenizer of the no-argument
    run uses the cosine head: every word is used and the soft targets are peaked, as with a
    trained tokenizer, while the targets stay a fixed function of the pixels.
    """

    kind = "customized"

    def __init__(self, image_size: int = 112, input_transform=None, cosine_scale: float = 0.0, **config: int):
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown customized tokenizer config keys {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        merged = {**CUSTOM_DEFAULT_CONFIG, **{k: int(v) for k, v in config.items()}}
        if input_transform is None:
            input_transform = Normalize((0.5,) * merged["input_channels"], (0.5,) * merged["input_channels"])
        super().__init__(image_size=image_size, input_transform=input_transform, **merged)
        self.cosine_scale = float(cosine_scale)

    @property
    def config(self) -> Dict[str, Any]:
        return {**super().config, "cosine_scale": self.cosine_scale}

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.cosine_scale:
            return super().compute_logits(images)
        hidden = F.relu(self.blocks[:-1](images))                      # (B, C, h, w) before the output conv
        hidden = F.normalize(hidden - hidden.mean(dim=1, keepdim=True), dim=1)
        words = F.normalize(self.blocks.output.conv.w.flatten(1), dim=1)  # (V, C)
        return self.cosine_scale * torch.einsum("bchw,vc->bvhw", hidden, words)  # (B, V, h, w)


def save_custom_tokenizer(tokenizer: CustomTokenizer, path) -> None:
    """Write a :class:`CustomTokenizer` (config + weights) to ``path``."""
    if not isinstance(tokenizer, CustomTokenizer):
        raise TypeError(
            f"save_custom_tokenizer expects a CustomTokenizer (kind 'customized'), got {type(tokenizer).__name__}; "
            "its file reloads with the customized (x - 0.5) / 0.5 normalisation"
        )
    payload = {
        "kind": "customized",
        "format_version": CUSTOM_FORMAT_VERSION,
        "config": dict(tokenizer.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in tokenizer.state_dict().items()},
    }
    torch.save(payload, os.fspath(path))


def load_custom_tokenizer(path, image_size: int = 112) -> CustomTokenizer:
    """Read a file written by :func:`save_custom_tokenizer` (``torch.load(weights_only=True)``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"customized tokenizer weights must be a file written by save_custom_tokenizer, got the folder {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"customized tokenizer weight file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(payload, Mapping) or payload.get("kind") != "customized":
        kind = payload.get("kind") if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(
            f"{path} is not a customized tokenizer file (expected a dict with kind='customized', "
            f"config and state_dict; got kind={kind!r})"
        )
    version = payload.get("format_version", CUSTOM_FORMAT_VERSION)
    if version > CUSTOM_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this mcbeit reads up to {CUSTOM_FORMAT_VERSION}")
    config: Optional[Mapping[str, Any]] = payload.get("config")
    state_dict = payload.get("state_dict")
    if not isinstance(config, Mapping) or not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: 'config' and 'state_dict' must both be dicts")
    tokenizer = CustomTokenizer(image_size=image_size, **config)
    report = compare_state_dict(tokenizer, state_dict)
    if report:
        raise ValueError(f"{path}: state_dict does not match its config {dict(config)}:\n{report.describe()}")
    tokenizer.load_state_dict(state_dict, strict=True)
    tokenizer.random_weights = False
    return tokenizer
