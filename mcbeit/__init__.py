"""mc-BEiT, BEiT, BEiT v2, ConMIM: masked image modelling on today's PyTorch.

``import mcbeit`` registers this package's model names with timm
(``beit_{tiny,small,base,large}_patch16_224_8k_vocab``, their BEiT v2 ``..._8k_vocab_cls_pt``,
ConMIM's ``conmim_{tiny,small,base,large}_patch16_224``, ``beit_{tiny,small}_patch16_224``), so
``import mcbeit, timm; timm.create_model("beit_base_patch16_224_8k_vocab")`` works, and exposes the
public names below. Both happen lazily: importing timm takes seconds (it imports torch and
torchvision), which every command's ``--help`` would pay. So the names register the moment timm
is imported (or at once, when it already is), and ``mcbeit.X`` imports X's module when first used.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first use)
_PUBLIC = {
    # models (registered with timm)
    "BeitForMaskedImageModeling": "mcbeit.models", "BeitV2ForMaskedImageModeling": "mcbeit.models.beit",
    "ConMIMForMaskedImageModeling": "mcbeit.models.beit",
    "build_classifier": "mcbeit.models.classifier",
    "LinearProbe": "mcbeit.models.linear_probe", "load_pretrained": "mcbeit.models",
    "convert_state_dict": "mcbeit.models", "load_for_export": "mcbeit.models",
    # tokenizers
    "build_tokenizer": "mcbeit.tokenizers", "Tokenizer": "mcbeit.tokenizers", "TOKENIZER_KINDS": "mcbeit.tokenizers",
    "VQKD": "mcbeit.tokenizers.vqkd", "build_vqkd_tokenizer": "mcbeit.tokenizers.vqkd",
    "build_teacher": "mcbeit.tokenizers.teachers",
    # objectives
    "MultiChoiceLoss": "mcbeit.objectives", "HardTokenLoss": "mcbeit.objectives", "build_objective": "mcbeit.objectives",
    "PatchAggregationLoss": "mcbeit.objectives", "DenoisingContrastLoss": "mcbeit.objectives",
    "VQVAETraining": "mcbeit.objectives.vqvae",
    # pre-training methods, configurations, the engine
    "METHODS": "mcbeit.methods", "PretrainMethod": "mcbeit.methods",
    "PretrainConfig": "mcbeit.config.pretrain", "BeitPretrainConfig": "mcbeit.config.pretrain",
    "BeitV2PretrainConfig": "mcbeit.config.pretrain", "ConMIMPretrainConfig": "mcbeit.config.pretrain",
    "VQKDTrainConfig": "mcbeit.config.vqkd",
    "FinetuneConfig": "mcbeit.config.finetune", "LinprobeConfig": "mcbeit.config.finetune",
    "TokenizerTrainConfig": "mcbeit.config.tokenizer", "resolve": "mcbeit.config",
    "Trainer": "mcbeit.engine.trainer",
    "PretrainTask": "mcbeit.tasks.pretrain", "FinetuneTask": "mcbeit.tasks.finetune",
    "TokenizerTrainingTask": "mcbeit.tasks.tokenizer", "VQKDTrainingTask": "mcbeit.tasks.vqkd",
    # the Python API: every model from a name or a file, and inference on images
    "list_models": "mcbeit.api", "get_model": "mcbeit.api", "inference_model": "mcbeit.api",
    "data_config": "mcbeit.api",
    # errors
    "InputError": "mcbeit.errors", "ConfigError": "mcbeit.errors",
}

__all__ = list(_PUBLIC)  # noqa: PLE0605  (the names of _PUBLIC, resolved lazily by __getattr__)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mcbeit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Import ``mcbeit.models`` (which registers the names) right after timm itself is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)                      # once: find the real timm with the other finders
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            importlib.import_module("mcbeit.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("mcbeit.models")
elif not any(isinstance(finder, _RegisterWithTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
