"""Models: the BEiT backbones (importing this registers their timm names) and BEiT-family weights.

* :class:`BeitForMaskedImageModeling` (pre-training), :func:`build_classifier` (timm's ``Beit`` from the
  fine-tuning flags), :class:`LinearProbe`;
* :func:`load_pretrained` ``(model, file)``: any BEiT-family checkpoint into any BEiT model through the
  one conversion (:func:`convert_state_dict`), the one ``--finetune`` (:func:`load_for_finetuning`) and
  this package's registered names with ``pretrained=True`` use; :func:`load_for_export`;
* checkpoint reading and its errors (:mod:`mcbeit.models.checkpoint`).
"""
from . import beit, checkpoint  # noqa: F401  (beit registers the timm names)
from .beit import BeitForMaskedImageModeling
from .beit_weights import (ConversionReport, checkpoint_filter_fn, convert_state_dict, load_for_finetuning,
                           load_pretrained)
from .checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    LoadReport,
    StateDictMismatchError,
    UnsafeCheckpointError,
    extract_state_dict,
    filter_pretraining_state_dict,
    load_checkpoint_file,
    load_into,
)
from .classifier import build_classifier, classifier_kwargs, classifier_names
from .export import ExportError, load_for_export
from .linear_probe import LinearProbe

__all__ = [
    'BeitForMaskedImageModeling', 'build_classifier', 'classifier_kwargs', 'classifier_names', 'LinearProbe',
    'load_pretrained', 'load_for_finetuning', 'convert_state_dict', 'checkpoint_filter_fn', 'ConversionReport',
    'load_for_export', 'ExportError',
    'CheckpointError', 'CheckpointNotFoundError', 'LoadReport', 'StateDictMismatchError', 'UnsafeCheckpointError',
    'extract_state_dict', 'filter_pretraining_state_dict', 'load_checkpoint_file', 'load_into',
]
