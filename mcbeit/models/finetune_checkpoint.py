"""Former home of ``--finetune``'s loading; its names, for the callers that still import them from here.

The conversion is :mod:`mcbeit.models.beit_weights` (``load_for_finetuning``, ``load_pretrained``,
``convert_state_dict``), the sources are :mod:`mcbeit.models.checkpoint` (``resolve_source``,
``read_checkpoint``, ``select_state_dict``) and the interpolation is :mod:`mcbeit.models.position_resize`.
Import them from there; this module goes once ``engine/trainer.py``, ``tasks/finetune.py`` and their
tests do.
"""
from mcbeit.models.beit_weights import ConversionReport as FinetuneReport
from mcbeit.models.beit_weights import adapt_state_dict, load_for_finetuning
from mcbeit.models.checkpoint import read_checkpoint, resolve_source, select_state_dict
from mcbeit.models.position_resize import interpolate_pos_embed, interpolate_rel_pos_table, relative_position_coords

__all__ = ['FinetuneReport', 'load_for_finetuning', 'resolve_source', 'read_checkpoint', 'select_state_dict',
           'adapt_state_dict', 'relative_position_coords', 'interpolate_rel_pos_table', 'interpolate_pos_embed']
