"""Batches for a trial's rank: from images held on the device, or from a torch DataLoader.

:class:`DeviceLoader` keeps the decoded uint8 tensors on the worker's device and augments
whole batches there (no loader processes); ``loader="torch"`` keeps the classic
``DataLoader`` with per-sample torchvision transforms (streaming image folders from disk) for
data that does not fit, or whose images differ in size (ImageNet). :func:`build_loaders`
picks one from a trial's settings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .augment import BatchAugment, imagenet_transform, torch_transform
from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    dataset_stats,
    decode_image,
    load_dataset,
    stratified_indices,
    survey,
)
from .sources import FOLDER_DATASETS, Layout, find_layout


class DeviceLoader:
    """Batches of this rank's shard of a seeded permutation, from images on the device.

    Every rank draws the same permutation for an epoch (from ``seed`` and the epoch), pads it
    by wrapping so it divides by the world size (as ``DistributedSampler`` does), and takes
    every ``world``-th index from its rank: shards are disjoint and cover the epoch, and all
    ranks step the same number of times. For evaluation (``shuffle=False``) the shards are
    disjoint without padding, so every test image is counted exactly once.
    """

    def __init__(self, data: ImageSet, batch_size: int, augment: BatchAugment,
                 device: torch.device, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.augment, self.device = batch_size, augment, device
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world, device=self.device)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        total = math.ceil(n / self.world) * self.world
        order = torch.cat([order, order[: total - n]]) if total > n else order
        return order[self.rank::self.world].to(self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = math.ceil(n / self.world) if self.shuffle else len(range(self.rank, n,
                                                                              self.world))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._indices()
        g = None
        if self.augment.train:
            g = torch.Generator(device=self.device)
            g.manual_seed((self.seed * 100_003 + self.epoch) * 1009 + self.rank)
        for start in range(0, len(index), self.batch_size):
            batch = index[start:start + self.batch_size]
            yield self.augment(self.images[batch], g), self.labels[batch]


# -- the torch DataLoader path ---------------------------------------------------------------
class Transformed(torch.utils.data.Dataset):
    """``dataset[index[i]]`` through a per-sample transform."""

    def __init__(self, dataset, index: torch.Tensor, transform) -> None:
        self.dataset, self.index, self.transform = dataset, index.tolist(), transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.index[i]]
        return self.transform(image), int(label)


class _InMemory(torch.utils.data.Dataset):
    def __init__(self, data: ImageSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.images[i], self.data.labels[i]


def in_memory_dataset(data: ImageSet) -> torch.utils.data.Dataset:
    """An ImageSet as a map-style dataset of (uint8 image, label)."""
    return _InMemory(data)


def streams_from_disk(cfg: Any) -> bool:
    """Whether a trial reads its images from disk as it goes rather than from memory."""
    return cfg.loader == "torch" and cfg.ds in FOLDER_DATASETS and cfg.mode != "bt"


class Streamed(torch.utils.data.Dataset):
    """One split of a layout, read and decoded image by image: (RGB image, label)."""

    def __init__(self, layout: Layout, split: str) -> None:
        self.archive, self.items = layout.archive, layout.split(split)
        self.labels = torch.tensor([label for _, label in self.items], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        member, label = self.items[i]
        return decode_image(self.archive, member), label


def streamed_folders(ds: str, data_dir: str | None, seed: int, train_subset: int | None,
                     test_subset: int | None, norm: str):
    """Image folders read from disk image by image (for ``loader="torch"``): nothing is
    decoded up front, so the data need not fit in memory. Returns the two splits as
    (dataset, index) pairs, the class count, the normalisation statistics and the images'
    (height, width), or None for ImageNet and sets of several sizes (from a sample)."""
    layout = find_layout(ds, data_dir)
    splits = []
    for split, n, offset in (("train", train_subset, 0), ("test", test_subset, 1)):
        full = Streamed(layout, split)
        index = (stratified_indices(full.labels, len(layout.classes), n, seed + offset)
                 if n and n < len(full) else torch.arange(len(full)))
        splits.append((full, index))
    (train, train_index), (test, test_index) = splits
    sizes = survey(layout)
    size = None if ds == "imagenet" or len(sizes) > 1 else next(iter(sizes))[::-1]
    if norm == "imagenet" or ds == "imagenet":
        stats = (IMAGENET_MEAN, IMAGENET_STD)
    else:  # estimate from a sample, without reading the whole set
        sample = train_index[torch.randperm(len(train_index),
                                            generator=torch.Generator().manual_seed(seed))[:2000]]
        total, squares, count = np.zeros(3), np.zeros(3), 0
        for i in sample.tolist():
            pixels = np.asarray(train[i][0], dtype=np.float64).reshape(-1, 3) / 255
            total += pixels.sum(0)
            squares += (pixels ** 2).sum(0)
            count += len(pixels)
        mean = total / count
        stats = (tuple(mean.tolist()), tuple(np.sqrt(squares / count - mean ** 2).tolist()))
    return (train, train_index), (test, test_index), len(layout.classes), stats, size


class EpochLoader:
    """A DataLoader behaving like the device loader: ``set_epoch`` reseeds the sampler's
    order, batches arrive on the device. (Ray's ``prepare_data_loader`` would add its own,
    unseeded sampler; moving batches here also keeps the loop usable without Ray.)"""

    def __init__(self, loader, device: torch.device, sampler=None) -> None:
        self.loader, self.device, self.sampler = loader, device, sampler

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _seed_loader_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _torch_loader(cfg: Any, rank: int, world: int, device: torch.device, source, transform,
                  per_worker: int, train: bool) -> EpochLoader:
    """The classic path: a DataLoader with per-sample transforms and a seeded sampler."""
    dataset = Transformed(*source, transform)
    if train:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    else:  # every test image exactly once over the ranks
        sampler = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_worker, sampler=sampler, num_workers=cfg.loader_workers,
        worker_init_fn=_seed_loader_worker, persistent_workers=cfg.loader_workers > 0,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return EpochLoader(loader, device, sampler if train else None)


def build_loaders(cfg: Any, rank: int, world: int, device: torch.device):
    """Train and test batch iterables for this rank, plus the number of classes.

    ``cfg`` is a trial's settings (a TrialConfig, or anything with its ``ds``, ``data_dir``,
    ``seed``, ``train_subset``, ``test_subset``, ``norm``, ``loader``, ``loader_workers``,
    ``mode`` and ``bs``); ``bs`` is the global batch, split evenly over the ``world`` ranks.
    Images of one size get the reference augmentation; ImageNet, and folders of several
    sizes (streamed), the ImageNet pipeline at 224x224.
    """
    per_worker = cfg.bs // world
    if streams_from_disk(cfg):
        train, test, num_classes, (mean, std), size = streamed_folders(
            cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset, cfg.test_subset, cfg.norm)
    else:
        train_set, test_set = load_dataset(cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset,
                                           cfg.test_subset)
        mean, std = dataset_stats(cfg.ds, cfg.norm, train_set)
        num_classes, size = train_set.num_classes, tuple(train_set.images.shape[-2:])
        if cfg.loader == "device":
            train_loader = DeviceLoader(train_set, per_worker, BatchAugment(mean, std), device,
                                        rank, world, cfg.seed, shuffle=True)
            test_loader = DeviceLoader(test_set, per_worker, BatchAugment(mean, std, train=False),
                                       device, rank, world, cfg.seed, shuffle=False)
            return train_loader, test_loader, num_classes
        train = (in_memory_dataset(train_set), torch.arange(len(train_set)))
        test = (in_memory_dataset(test_set), torch.arange(len(test_set)))
    loaders = []
    for source, is_train in ((train, True), (test, False)):
        transform = (imagenet_transform(mean, std, is_train) if size is None
                     else torch_transform(mean, std, size, is_train))
        loaders.append(_torch_loader(cfg, rank, world, device, source, transform, per_worker,
                                     is_train))
    return loaders[0], loaders[1], num_classes
