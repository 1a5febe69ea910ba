"""Data for masked image modelling: datasets, the two-view transform, patch masks, samplers."""

from .datasets import ImageDataset, build_pretraining_dataset, load_rgb_image
from .embedded import EMBEDDED_CLASSES, embedded_dataset_root
from .masking import BlockMaskGenerator, RandomMaskGenerator, build_mask_generator
from .samplers import EpochTaggedSampler
from .transforms import TwoViewTransform, parse_interpolation

__all__ = [
    "BlockMaskGenerator",
    "EMBEDDED_CLASSES",
    "EpochTaggedSampler",
    "ImageDataset",
    "RandomMaskGenerator",
    "TwoViewTransform",
    "build_mask_generator",
    "build_pretraining_dataset",
    "embedded_dataset_root",
    "load_rgb_image",
    "parse_interpolation",
]
