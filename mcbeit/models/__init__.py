"""Models: the BEiT pre-training backbone (registers its timm names on import) and checkpoint I/O."""
from . import beit, checkpoint
from .beit import BeitForMaskedImageModeling
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

__all__ = [
    'BeitForMaskedImageModeling', 'CheckpointError', 'CheckpointNotFoundError', 'LoadReport',
    'StateDictMismatchError', 'UnsafeCheckpointError', 'extract_state_dict',
    'filter_pretraining_state_dict', 'load_checkpoint_file', 'load_into',
]
