"""Datasets for the trials, one module per concept (each imports only those listed above it):

- ``sources``: where data lives (one data-root helper, the cache folder), finding each
  source and its layout (the splits of an image folder or zip, nothing decoded):
  torchvision's ImageFolder layout and Tiny ImageNet's official one;
- ``cifar``: CIFAR-10/100 from their official tarballs (downloaded only when absent);
- ``synthetic``: the generated offline dataset;
- ``decode``: every dataset decoded once into cached uint8 tensors; subsets and statistics;
- ``augment``: the batched device augmentation and the per-sample torchvision pipelines;
- ``loaders``: the device loader and the torch DataLoader path, picked by ``build_loaders``;
- ``check``: the pre-start check run before Ray starts;
- ``cost``: the GPU-hours estimate of ``grid --dry-run``.
"""

from .augment import BatchAugment, imagenet_transform, torch_transform
from .check import check_trial, check_trials, ensure_available
from .cost import cost_estimate
from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    dataset_stats,
    decode_image,
    load_dataset,
    stratified_indices,
    stratified_subset,
)
from .loaders import (
    DeviceLoader,
    EpochLoader,
    Streamed,
    Transformed,
    build_loaders,
    in_memory_dataset,
    streamed_folders,
    streams_from_disk,
)
from .sources import (
    DATASETS,
    FOLDER_DATASETS,
    Archive,
    DataError,
    Layout,
    cache_dir,
    data_root,
    default_data_dir,
    find_layout,
    folder_source,
)
from .synthetic import synthetic_arrays

__all__ = [
    "DATASETS", "FOLDER_DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "Archive", "BatchAugment",
    "DataError", "DeviceLoader", "EpochLoader", "ImageSet", "Layout", "Streamed", "Transformed",
    "build_loaders", "cache_dir", "check_trial", "check_trials", "cost_estimate", "data_root",
    "dataset_stats", "decode_image", "default_data_dir", "ensure_available", "find_layout",
    "folder_source", "imagenet_transform", "in_memory_dataset", "load_dataset",
    "stratified_indices", "stratified_subset", "streamed_folders", "streams_from_disk",
    "synthetic_arrays", "torch_transform",
]
