"""Classification models for fine-tuning: timm's plain ``Beit`` built from the original fine-tuning flags.

The names are timm's own (``beit_base_patch16_224``, ``beit_large_patch16_224``, ...) plus the
tiny and small sizes registered in :mod:`mcbeit.models.beit` where timm lacks them, so a
fine-tuned state dict loads into plain timm with ``strict=True``.

Flag -> timm argument (the original's ``create_model`` call):

- ``--nb_classes``             -> ``num_classes``
- ``--use_mean_pooling`` / ``--use_cls`` -> ``global_pool='avg'`` (``fc_norm`` after mean pooling,
  ``norm`` is Identity) / ``'token'`` (``norm`` then the CLS token)
- ``--init_scale``             -> ``head_init_scale`` (head weight and bias scaled after init)
- ``--rel_pos_bias`` / ``--disable_rel_pos_bias`` -> ``use_rel_pos_bias`` (a table per block)
- ``--abs_pos_emb``            -> ``use_abs_pos_emb``
- ``--layer_scale_init_value`` -> ``init_values`` (0 disables layer scale: ``None``)
- ``--drop`` / ``--attn_drop_rate`` / ``--drop_path`` -> ``drop_rate`` / ``attn_drop_rate`` / ``drop_path_rate``
- ``--input_size``             -> ``img_size``
"""
from __future__ import annotations

from typing import Any

import timm
from timm.models.beit import Beit

import mcbeit.models.beit  # noqa: F401  (registers the tiny and small sizes where timm lacks them)
from mcbeit.errors import InputError

__all__ = ["classifier_kwargs", "build_classifier", "classifier_names"]


def classifier_names() -> list[str]:
    """BEiT classification models known to timm (ours included), without the pre-training ``_8k_vocab`` ones
    (BEiT v2's ``_8k_vocab_cls_pt`` included; ConMIM's ``conmim_*`` are not ``beit_*``)."""
    return sorted(n for n in timm.list_models(["beit_*", "beitv2_*"]) if "_8k_vocab" not in n)


def classifier_kwargs(*, nb_classes: int, input_size: int = 224, use_mean_pooling: bool = True,
                      init_scale: float = 0.001, rel_pos_bias: bool = True, abs_pos_emb: bool = False,
                      layer_scale_init_value: float = 0.1, drop: float = 0.0, attn_drop_rate: float = 0.0,
                      drop_path: float = 0.1) -> dict[str, Any]:
    """timm ``create_model`` keyword arguments for the original fine-tuning flags (see the module doc)."""
    init_values = float(layer_scale_init_value)
    return dict(num_classes=int(nb_classes), img_size=int(input_size),
                global_pool="avg" if use_mean_pooling else "token", head_init_scale=float(init_scale),
                use_rel_pos_bias=bool(rel_pos_bias), use_abs_pos_emb=bool(abs_pos_emb),
                init_values=init_values if init_values > 0 else None, drop_rate=float(drop),
                attn_drop_rate=float(attn_drop_rate), drop_path_rate=float(drop_path))


def classifier_counterpart(name: str) -> str:
    """The classification model of a pre-training name: ``beit_base_patch16_224_8k_vocab`` (BEiT, mc-BEiT),
    ``..._8k_vocab_cls_pt`` (BEiT v2) and ``conmim_base_patch16_224`` (ConMIM) give ``beit_base_patch16_224``;
    any other name is returned as it is."""
    if "_8k_vocab" in name:
        return name[:name.index("_8k_vocab")]
    if name.startswith("conmim_"):
        return "beit_" + name[len("conmim_"):]
    return name


def build_classifier(name: str, **kwargs: Any) -> Beit:
    """``timm.create_model(name, pretrained=False, **classifier_kwargs(**kwargs))``.

    Raises :class:`~mcbeit.errors.InputError` for a name that is not a BEiT classifier (a pre-training
    name gets its classification counterpart as a hint). Weights: :func:`mcbeit.models.load_pretrained`.
    """
    names = classifier_names()
    if name not in names:
        counterpart = classifier_counterpart(name)
        hint = (f"{name} is a pre-training model; fine-tune its classification counterpart {counterpart}"
                if counterpart != name else f"{name} is not a BEiT classifier")
        raise InputError(f"--model {name}: {hint}; choose one of {names}")
    model = timm.create_model(name, pretrained=False, **classifier_kwargs(**kwargs))
    if not isinstance(model, Beit):  # pragma: no cover - every beit* name of timm builds a Beit
        raise InputError(f"--model {name} built a {type(model).__name__}, not a BEiT")
    return model
