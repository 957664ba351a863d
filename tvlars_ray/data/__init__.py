"""Datasets for the trials, in four layers (each imports only those above it):

- ``sources``: where data lives (one data-root helper, the cache folder), finding and
  downloading sources, listing an image folder or zip without decoding it;
- ``synthetic``: the generated offline dataset;
- ``decode``: every dataset decoded once into cached uint8 tensors; subsets and statistics;
- ``augment``: the batched device augmentation and the per-sample torchvision pipelines;
- ``loaders``: the device loader and the torch DataLoader path, picked by ``build_loaders``;
- ``check``: the pre-start check run before Ray starts.
"""

from .augment import BatchAugment, torch_transform
from .check import ensure_available
from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    dataset_stats,
    load_dataset,
    load_imagefolder,
    stratified_indices,
    stratified_subset,
)
from .loaders import (
    DeviceLoader,
    EpochLoader,
    Transformed,
    build_loaders,
    in_memory_dataset,
    streamed_folders,
)
from .sources import (
    DATASETS,
    FOLDER_DATASETS,
    DataError,
    cache_dir,
    data_root,
    default_data_dir,
    folder_source,
    imagefolder_dir,
)
from .synthetic import synthetic_arrays

__all__ = [
    "DATASETS", "FOLDER_DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "BatchAugment", "DataError",
    "DeviceLoader", "EpochLoader", "ImageSet", "Transformed", "build_loaders", "cache_dir",
    "data_root", "dataset_stats", "default_data_dir", "ensure_available", "folder_source",
    "imagefolder_dir", "in_memory_dataset", "load_dataset", "load_imagefolder",
    "stratified_indices", "stratified_subset", "streamed_folders", "synthetic_arrays",
    "torch_transform",
]
