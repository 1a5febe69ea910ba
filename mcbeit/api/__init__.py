"""The Python API: every model this package trains, from a name or a file, ready for inference.

As mmpretrain's (BEiT v2's seed README)::

    import mcbeit
    model = mcbeit.get_model("output/mcbeit_finetuned")          # a checkpoint file or a run's output folder
    feats = model.extract_feat(torch.rand(1, 3, 224, 224))      # (1, 768): the pooled feature of a classifier
    predict = mcbeit.inference_model(model, "bird.jpg")         # {'pred_label', 'pred_score', 'pred_class', ...}

* :func:`list_models` / :func:`get_model` (:mod:`mcbeit.api.models`): names (this package's, timm's BEiT family,
  the seed's mmpretrain names, the segmentation and detection presets) and files (a checkpoint of any command
  here, a run's output folder, an ``mcbeit-export`` folder, released BEiT / mc-BEiT / BEiT v2 / ConMIM files).
  The model comes back in eval mode with ``model.pretrained_cfg`` (its preprocessing), ``model.mcbeit``
  (:class:`ModelInfo`: kind, classes, source) and ``model.extract_feat``.
* :func:`inference_model` (:mod:`mcbeit.api.inference`): images (paths, PIL images, arrays, lists of them) to one
  dict per image: class scores, a label map, boxes and masks, or a pre-training model's visual tokens.
* :func:`data_config`: the preprocessing of a model, as timm's ``resolve_model_data_config``.
"""
from __future__ import annotations

from mcbeit.api.inference import inference_model
from mcbeit.api.models import ModelInfo, data_config, get_model, list_models

__all__ = ["list_models", "get_model", "inference_model", "data_config", "ModelInfo"]
