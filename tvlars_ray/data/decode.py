"""Datasets decoded once into uint8 tensors (N, C, H, W), cached, with subsets and statistics.

No trial re-decodes JPEGs every epoch: a source is decoded into ``.npy`` arrays in the cache
on first use, and every later trial and worker loads them in a fraction of a second. The
cache folder appears only when complete (built in a temporary folder, then renamed), so a
decode that dies half-way leaves nothing a later load would trust.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from .cifar import CIFAR, find_cifar, read_cifar
from .sources import (
    DATASETS,
    Archive,
    DataError,
    Layout,
    cache_dir,
    data_root,
    folder_source,
    layout_at,
)
from .synthetic import SYNTHETIC_SIZES, synthetic_arrays

# Bumped when the cache's content changes meaning: older caches are then ignored.
CACHE_VERSION = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) with int64 labels: small enough to live on a device."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, from (a sample of) the images."""
        x = self.images[: 20000].float().div_(255)
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


def load_dataset(ds: str, data_dir: str | None, seed: int,
                 train_subset: int | None = None,
                 test_subset: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Both splits of a dataset as uint8 tensors, with seeded stratified subsets."""
    if ds == "synthetic":
        sets = []
        for split, n in (("train", train_subset), ("test", test_subset)):
            images, labels = synthetic_arrays(n or SYNTHETIC_SIZES[split], seed, split)
            sets.append(ImageSet(images, labels, tuple(str(c) for c in range(10))))
        return sets[0], sets[1]
    if ds not in DATASETS:
        raise DataError(f"unknown dataset '{ds}': choose one of {', '.join(DATASETS)}")
    train, test = read_cache(decoded(ds, data_dir))
    return (stratified_subset(train, train_subset, seed),
            stratified_subset(test, test_subset, seed + 1))


def stratified_subset(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """``n`` samples with the classes in the same proportions, chosen by ``seed``."""
    if n is None or n >= len(data):
        return data
    return data.subset(stratified_indices(data.labels, data.num_classes, n, seed))


def stratified_indices(labels: torch.Tensor, num_classes: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    by_class = [order[labels[order] == c] for c in range(num_classes)]
    quota = [int(n * len(idx) / len(labels)) for idx in by_class]
    for c in sorted(range(len(quota)), key=lambda c: -len(by_class[c]))[: n - sum(quota)]:
        quota[c] += 1
    return torch.cat([idx[:q] for idx, q in zip(by_class, quota)]).sort().values


def dataset_stats(ds: str, norm: str, train: ImageSet) -> tuple[tuple[float, ...], ...]:
    """Normalisation mean and std: the dataset's own, or ImageNet's as the reference code."""
    if norm == "imagenet" or ds == "imagenet":  # ImageNet's statistics are its own
        return IMAGENET_MEAN, IMAGENET_STD
    if ds == "cifar10":
        return _CIFAR10_STATS
    if ds == "cifar100":
        return _CIFAR100_STATS
    return train.channel_stats()


# -- the cache ---------------------------------------------------------------------------------
def decoded(ds: str, data_dir: str | None) -> Path:
    """The cache folder of a dataset read from files, decoding it first if needed."""
    if ds in CIFAR:
        path = find_cifar(ds, data_root(data_dir))
        return cached(path, lambda folder: write_cifar(ds, path, folder))
    path = folder_source(ds, data_dir)
    return cached(path, lambda folder: write_layout(layout_at(ds, path), folder))


def cached(source: Path, build: Callable[[Path], None]) -> Path:
    """The cache folder of ``source``, made by ``build(folder)`` unless already complete.

    Keyed by the source's path, size and mtime. ``build`` writes into a temporary folder
    renamed into place only when it returns, all under a lock: whoever holds the lock is the
    only writer, so temporary folders found then were left by a killed decode and go.
    """
    stat = source.stat()
    key = hashlib.sha1(f"{CACHE_VERSION}:{source}:{stat.st_size}:{stat.st_mtime_ns}"
                       .encode()).hexdigest()[:16]
    target = cache_dir() / "decoded" / f"{source.stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "done").exists():
            return target
        for stale in target.parent.iterdir():
            if stale.name.startswith(f"{target.name}.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # not done: never trusted
            shutil.rmtree(target)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / "done").write_text("ok")
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_cache(folder: Path) -> tuple[ImageSet, ImageSet]:
    classes = tuple((folder / "classes.txt").read_text().split("\n"))
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(np.load(folder / f"{split}_images.npy")),
                 torch.from_numpy(np.load(folder / f"{split}_labels.npy")), classes)
        for split in ("train", "test"))


def decode_image(archive: Archive, member: str) -> Image.Image:
    """One image as RGB; one that cannot be decoded is a DataError naming it."""
    data = archive.read(member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{archive.where(member)} is not a readable image ({exc}): replace or "
                        f"remove it") from None


def write_layout(layout: Layout, folder: Path) -> None:
    """Decode every image of a layout into ``folder``: ``{split}_images.npy`` (uint8, NCHW,
    written as it goes, so the set never has to fit in memory twice), labels, class names.
    Images of another size than the first are refused, never silently resized."""
    first = None
    for split in ("train", "test"):
        items = layout.split(split)
        images = None
        for i, (member, _) in enumerate(items):
            image = decode_image(layout.archive, member)
            first = first or (member, image.size)
            if image.size != first[1]:
                raise mixed_sizes(layout, {first[1]: first[0], image.size: member},
                                  IN_MEMORY_FIX)
            if images is None:
                width, height = first[1]
                images = np.lib.format.open_memmap(folder / f"{split}_images.npy", mode="w+",
                                                   dtype=np.uint8,
                                                   shape=(len(items), 3, height, width))
            images[i] = np.asarray(image).transpose(2, 0, 1)
        images.flush()
        del images
        np.save(folder / f"{split}_labels.npy",
                np.array([label for _, label in items], dtype=np.int64))
    (folder / "classes.txt").write_text("\n".join(layout.classes))


IN_MEMORY_FIX = ("the in-memory loader (loader device, and Barlow Twins mode) needs one size: "
                 "stream them with --set loader=torch, or resize them to one size first")


def mixed_sizes(layout: Layout, sizes: dict[tuple[int, int], str], fix: str) -> DataError:
    """The error for a set of images of several sizes, naming two of them."""
    (a, first), (b, other) = list(sizes.items())[:2]
    return DataError(f"{layout.path} holds images of different sizes ({first} is {a[0]}x{a[1]}, "
                     f"{other} is {b[0]}x{b[1]}): {fix}")


def write_cifar(ds: str, source: Path, folder: Path) -> None:
    train_images, train_labels, test_images, test_labels, classes = read_cifar(ds, source)
    for split, images, labels in (("train", train_images, train_labels),
                                  ("test", test_images, test_labels)):
        np.save(folder / f"{split}_images.npy", images)
        np.save(folder / f"{split}_labels.npy", labels)
    (folder / "classes.txt").write_text("\n".join(classes))


def survey(layout: Layout, per_split: int = 64, seed: int = 0) -> dict[tuple[int, int], str]:
    """Decode a seeded sample of each split: {(width, height): a member of that size}."""
    sizes: dict[tuple[int, int], str] = {}
    g = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        items = layout.split(split)
        for i in torch.randperm(len(items), generator=g)[:per_split].tolist():
            sizes.setdefault(decode_image(layout.archive, items[i][0]).size, items[i][0])
    return sizes
