"""Datasets decoded once into uint8 tensors (N, C, H, W), cached, with subsets and statistics.

No trial re-decodes JPEGs every epoch: an image folder is decoded into ``.npy`` arrays in the
cache on first use, and every later trial and worker loads them in a fraction of a second.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from .sources import (
    DATASETS,
    DataError,
    cache_dir,
    cifar_arrays,
    data_root,
    existing,
    find_tinyimagenet,
    imagefolder_needs_dir,
    list_images,
    no_images,
    source_key,
)
from .synthetic import SYNTHETIC_SIZES, synthetic_arrays

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
    root = data_root(data_dir)
    if ds in ("cifar10", "cifar100"):
        train, test = (ImageSet(*arrays) for arrays in cifar_arrays(ds, root))
    elif ds == "tinyimagenet":
        train, test = load_imagefolder(find_tinyimagenet(root))
    elif ds == "imagefolder":
        if not data_dir:
            raise imagefolder_needs_dir()
        train, test = load_imagefolder(root)
    else:
        raise DataError(f"unknown dataset '{ds}': choose one of {', '.join(DATASETS)}")
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
    if norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if ds == "cifar10":
        return _CIFAR10_STATS
    if ds == "cifar100":
        return _CIFAR100_STATS
    return train.channel_stats()


# -- image folders (and zips of them), decoded once into a cache -------------------------------
def load_imagefolder(path: Path) -> tuple[ImageSet, ImageSet]:
    """``train/<class>/*`` and ``test/<class>/*`` from a folder or a .zip, decoded once.

    The decoded uint8 arrays are cached (keyed by the source's path, size and mtime), so each
    later trial and worker loads them in a fraction of a second.
    """
    path = existing(path)
    target = cache_dir() / "decoded" / f"{path.stem}-{source_key(path)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "done").exists():
            _decode_to_cache(path, target)
    classes = tuple((target / "classes.txt").read_text().split("\n"))
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(np.load(target / f"{split}_images.npy")),
                 torch.from_numpy(np.load(target / f"{split}_labels.npy")), classes)
        for split in ("train", "test"))


def _decode_to_cache(path: Path, target: Path) -> None:
    from PIL import Image

    splits, opener = list_images(path)
    for split, items in splits.items():
        if not items:
            raise no_images(path, split)
    classes = sorted({c for c, _ in splits["train"]})
    index = {c: i for i, c in enumerate(classes)}
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    size = None
    for split, items in splits.items():
        items.sort(key=lambda item: (index.get(item[0], -1), item[1]))
        unknown = {c for c, _ in items if c not in index}
        if unknown:
            raise DataError(f"{path}: {split}/ has classes missing from train/: {sorted(unknown)}")
        images = None
        for i, (_, name) in enumerate(items):
            img = Image.open(io.BytesIO(opener(name))).convert("RGB")
            if size is None:
                size = img.size
            if img.size != size:
                img = img.resize(size, Image.BILINEAR)
            if images is None:
                images = np.empty((len(items), 3, size[1], size[0]), dtype=np.uint8)
            images[i] = np.asarray(img).transpose(2, 0, 1)
        labels = np.array([index[c] for c, _ in items], dtype=np.int64)
        np.save(tmp / f"{split}_images.npy", images)
        np.save(tmp / f"{split}_labels.npy", labels)
    (tmp / "classes.txt").write_text("\n".join(classes))
    (tmp / "done").write_text("ok")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
