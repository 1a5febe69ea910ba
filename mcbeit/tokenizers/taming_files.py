"""Reading taming-transformers log folders safely: ``model.yaml`` (safe YAML) and Lightning's ``last.ckpt``
(``torch.load(weights_only=True)`` with inert placeholders for Lightning's metadata classes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch

def find_log_file(folder: Path, name: str, subfolders: Sequence[str]) -> Path:
    candidates = [folder / name] + [folder / sub / name for sub in subfolders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"VQGAN weight folder {folder} lacks {name} (looked for {', '.join(str(c) for c in candidates)}); "
        "expected model.yaml and last.ckpt"
    )


def preview_keys(items: Sequence[str], limit: int = 20) -> str:
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
