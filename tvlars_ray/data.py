"""Datasets as in-memory uint8 tensors, and the two ways of batching them.

Every dataset is decoded once into ``uint8`` tensors (N, C, H, W) and cached, so no trial
re-decodes JPEGs every epoch. :class:`DeviceLoader` keeps those tensors on the worker's
device and augments whole batches there (no loader processes); ``loader="torch"`` keeps the
classic ``DataLoader`` with per-sample torchvision transforms for data that does not fit.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from .errors import UserError

DATASETS = ("synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_SYNTHETIC_SIZES = {"train": 5000, "test": 1000}


class DataError(UserError, RuntimeError):
    """A dataset that cannot be found or read; the message says where to put the files."""


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


# -- where things live ---------------------------------------------------------------------
def default_data_dir() -> Path:
    return Path(os.environ.get("TVLARS_DATA_DIR") or cache_dir() / "data")


def cache_dir() -> Path:
    """Decoded and extracted datasets: TVLARS_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("TVLARS_CACHE_DIR"):
        return Path(os.environ["TVLARS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tvlars_ray"


# -- the synthetic dataset -------------------------------------------------------------------
def synthetic_arrays(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped (3x32x32, 10 classes) images that a small CNN learns and a linear model not.

    Each class owns four smooth random templates; a sample is one of them, blended with a
    template of another class, shifted by up to 6 pixels, maybe flipped, contrast-jittered
    and buried in pixel noise. The templates depend on ``seed`` only, so train and test
    share them; the samples depend on ``seed`` and ``split``.
    """
    classes, per_class, size = 10, 4, 32
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes * per_class, 3, 4, 4, generator=g)
    fine = torch.randn(classes * per_class, 3, 8, 8, generator=g)
    templates = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    templates += 0.5 * F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    templates /= templates.flatten(1).std(1).view(-1, 1, 1, 1)
    templates = templates.view(classes, per_class, 3, size, size)

    gs = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 1, "test": 2}[split])
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gs)]
    x = templates[labels, torch.randint(0, per_class, (n,), generator=gs)]
    other = (labels + torch.randint(1, classes, (n,), generator=gs)) % classes
    blend = torch.rand(n, 1, 1, 1, generator=gs) * 0.7
    x = x + blend * templates[other, torch.randint(0, per_class, (n,), generator=gs)]
    shift = torch.randint(-6, 7, (2, n), generator=gs)
    ar = torch.arange(size)
    rows = (ar[None, :] + shift[0][:, None]) % size
    cols = (ar[None, :] + shift[1][:, None]) % size
    x = x[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=gs) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs))
    x = x + 0.3 * torch.randn(n, 3, 1, 1, generator=gs)
    x = x + 1.0 * torch.randn(x.shape, generator=gs)
    images = ((x * 0.22 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


# -- loading -----------------------------------------------------------------------------------
def load_dataset(ds: str, data_dir: str | None, seed: int,
                 train_subset: int | None = None,
                 test_subset: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Both splits of a dataset as uint8 tensors, with seeded stratified subsets."""
    if ds == "synthetic":
        sets = []
        for split, n in (("train", train_subset), ("test", test_subset)):
            images, labels = synthetic_arrays(n or _SYNTHETIC_SIZES[split], seed, split)
            sets.append(ImageSet(images, labels, tuple(str(c) for c in range(10))))
        return sets[0], sets[1]
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if ds in ("cifar10", "cifar100"):
        train, test = _load_cifar(ds, root)
    elif ds == "tinyimagenet":
        train, test = _load_tinyimagenet(root)
    elif ds == "imagefolder":
        if not data_dir:
            raise DataError("dataset imagefolder needs --data-dir pointing at a folder or .zip "
                            "holding train/<class>/ and test/<class>/ images")
        train, test = load_imagefolder(root)
    else:
        raise DataError(f"unknown dataset '{ds}': choose one of {', '.join(DATASETS)}")
    return (stratified_subset(train, train_subset, seed),
            stratified_subset(test, test_subset, seed + 1))


def ensure_available(ds: str, data_dir: str | None) -> None:
    """Fail now, with the fix, if a dataset is missing (downloading it where that works)."""
    if ds == "synthetic":
        return
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if ds in ("cifar10", "cifar100"):
        _load_cifar(ds, root)
    elif ds == "tinyimagenet":
        _find_tinyimagenet(root)
    elif ds == "imagefolder":
        if not data_dir:
            raise DataError("dataset imagefolder needs --data-dir pointing at a folder or .zip "
                            "holding train/<class>/ and test/<class>/ images")
        splits, _ = _list_images(_existing(root))
        for split, items in splits.items():
            if not items:
                raise DataError(f"{root} has no images under {split}/<class>/: expected "
                                f"train/<class>/*.jpg and test/<class>/*.jpg")


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


def _missing(what: str, where: Path, fix: str) -> DataError:
    return DataError(f"{what} not found in {where} and it could not be downloaded: {fix}")


def _load_cifar(ds: str, root: Path) -> tuple[ImageSet, ImageSet]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if ds == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{ds}.lock")):
        try:
            sets = [cls(str(root), train=train, download=True) for train in (True, False)]
        except Exception as exc:  # torchvision raises URLError, RuntimeError, ... offline
            archive = cls.filename
            raise _missing(ds, root, f"put {archive} (from {cls.url}) into {root} or point "
                           f"--data-dir / TVLARS_DATA_DIR at a folder holding it ({exc})") from None
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                 torch.tensor(s.targets, dtype=torch.int64), tuple(s.classes))
        for s in sets)


def _load_tinyimagenet(root: Path) -> tuple[ImageSet, ImageSet]:
    return load_imagefolder(_find_tinyimagenet(root))


def _find_tinyimagenet(root: Path) -> Path:
    for candidate in (root / "tinyimagenet", root / "tinyimagenet.zip",
                      root / "tiny-imagenet-200", root):
        if (candidate / "train").is_dir() or candidate.suffix == ".zip" and candidate.exists():
            return candidate
    raise _missing("tinyimagenet", root,
                   f"put the prepared folder (train/<class>/, test/<class>/) or its .zip at "
                   f"{root / 'tinyimagenet'}[.zip], or point --data-dir at its parent")


# -- image folders (and zips of them), decoded once into a cache -------------------------------
def load_imagefolder(path: Path) -> tuple[ImageSet, ImageSet]:
    """``train/<class>/*`` and ``test/<class>/*`` from a folder or a .zip, decoded once.

    The decoded uint8 arrays are cached (keyed by the source's path, size and mtime), so each
    later trial and worker loads them in a fraction of a second.
    """
    path = _existing(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "decoded" / f"{path.stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "done").exists():
            _decode_to_cache(path, target)
    classes = tuple((target / "classes.txt").read_text().split("\n"))
    return tuple(  # type: ignore[return-value]
        ImageSet(torch.from_numpy(np.load(target / f"{split}_images.npy")),
                 torch.from_numpy(np.load(target / f"{split}_labels.npy")), classes)
        for split in ("train", "test"))


def _existing(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise _missing("image folder", path.parent,
                       f"expected {path} to be a folder or .zip with train/<class>/ and "
                       f"test/<class>/ images")
    return path


def _list_images(path: Path) -> tuple[dict[str, list[tuple[str, str]]], object]:
    """{split: [(class, member)]} and an opener for members, for a folder or a zip."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        opener = archive.read
    else:
        names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]

        def opener(name: str) -> bytes:
            return (path / name).read_bytes()
    for name in names:
        parts = Path(name).parts
        # accept an optional top-level folder inside the archive
        for i in range(min(2, len(parts) - 2)):
            if parts[i] in splits and len(parts) == i + 3:
                if name.lower().endswith(suffixes):
                    splits[parts[i]].append((parts[i + 1], name))
                break
    return splits, opener


def _decode_to_cache(path: Path, target: Path) -> None:
    from PIL import Image

    splits, opener = _list_images(path)
    for split, items in splits.items():
        if not items:
            raise DataError(f"{path} has no images under {split}/<class>/: expected "
                            f"train/<class>/*.jpg and test/<class>/*.jpg")
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
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)


FOLDER_DATASETS = ("imagefolder", "tinyimagenet")


def folder_source(ds: str, data_dir: str | None) -> Path:
    """The folder or zip an image-folder dataset is read from."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    return _find_tinyimagenet(root) if ds == "tinyimagenet" else _existing(root)


def streamed_folders(ds: str, data_dir: str | None, seed: int, train_subset: int | None,
                     test_subset: int | None, norm: str):
    """Image folders read from disk image by image (for ``loader="torch"``): nothing is
    decoded up front, so the data need not fit in memory. Returns the two splits as
    (dataset, transform-less) pairs, the class count and the normalisation statistics."""
    from torchvision.datasets import ImageFolder

    folder = imagefolder_dir(folder_source(ds, data_dir))
    splits = []
    for split, n, offset in (("train", train_subset, 0), ("test", test_subset, 1)):
        full = ImageFolder(str(folder / split))
        labels = torch.tensor(full.targets)
        index = (stratified_indices(labels, len(full.classes), n, seed + offset)
                 if n and n < len(full) else torch.arange(len(full)))
        splits.append((full, index))
    (train, train_index), (test, test_index) = splits
    if norm == "imagenet":
        stats = (IMAGENET_MEAN, IMAGENET_STD)
    else:  # estimate from a sample, without reading the whole set
        sample = train_index[torch.randperm(len(train_index),
                                            generator=torch.Generator().manual_seed(seed))[:2000]]
        total, squares, count = np.zeros(3), np.zeros(3), 0
        for i in sample.tolist():
            pixels = np.asarray(train[i][0].convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
            total += pixels.sum(0)
            squares += (pixels ** 2).sum(0)
            count += len(pixels)
        mean = total / count
        stats = (tuple(mean.tolist()), tuple(np.sqrt(squares / count - mean ** 2).tolist()))
    return (train, train_index), (test, test_index), len(train.classes), stats


def imagefolder_dir(path: Path) -> Path:
    """A folder holding train/ and test/: the folder itself, or a zip extracted once."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return path
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "extracted" / f"{path.stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / ".done").exists():
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target)
            (target / ".done").write_text("ok")
    for candidate in [target, *(p for p in target.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir():
            return candidate
    raise DataError(f"{path} has no train/ folder inside")


# -- batched augmentation on the device -----------------------------------------------------
class BatchAugment:
    """The reference augmentation for a whole uint8 batch at once, then normalisation.

    RandomCrop(size, padding=4) -> RandomHorizontalFlip -> RandomRotation(15), as one
    nearest-neighbour resampling with zero fill, the composition torchvision applies image
    by image: for every output pixel, the source pixel is found by undoing the rotation, the
    flip and the crop; pixels that land outside the image (padding, rotated-in corners) are
    zero. The gather runs on the uint8 images; one fused multiply-add then normalises.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4,
                 degrees: float = 15.0, train: bool = True) -> None:
        std_t = torch.tensor(std, dtype=torch.float32) * 255
        self.scale = (1 / std_t).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) * 255 / std_t).view(1, -1, 1, 1)
        self.padding, self.degrees, self.train = padding, degrees, train

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.train:
            images = self.resample(images, generator)
        if self.scale.device != images.device:  # once: no copy per batch
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images.float(), self.scale)

    def resample(self, images: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """The augmented uint8 batch.

        Undoing the rotation about the centre is linear in the output pixel (y, x), the flip
        negates x about the centre (a sign on the rotation's x row) and the crop adds an
        integer offset, so each source coordinate is a per-image (h, 1) column plus a
        per-image (1, w) row, rounded: few passes over the full grid.
        """
        n, c, h, w = images.shape
        dev = images.device
        p = self.padding
        # crop offsets in [-p, p]: the crop's pixel (r, c) is the source's (r + oy, c + ox)
        oy = torch.randint(-p, p + 1, (n, 1, 1), generator=g, device=dev).float()
        ox = torch.randint(-p, p + 1, (n, 1, 1), generator=g, device=dev).float()
        sign = 1 - 2 * (torch.rand(n, 1, 1, generator=g, device=dev) < 0.5).float()
        angle = (torch.rand(n, 1, 1, generator=g, device=dev) * 2 - 1) * math.radians(
            self.degrees)
        cos, sin = angle.cos(), angle.sin()
        cy, cx = (h - 1) / 2, (w - 1) / 2
        ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) - cy
        xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) - cx
        # source row and column of every output pixel (rotation, flip, crop undone)
        sy = (cos * ys + (cy + oy)) + (-sin * xs)
        sx = (sign * sin * ys + (cx + ox)) + (sign * cos * xs)
        sy, sx = sy.round_(), sx.round_()
        # inside the rotated frame (else zero) and inside the image (else padding, zero)
        valid = ((sy >= oy.clamp(min=0)) & (sy <= (h - 1) + oy.clamp(max=0))
                 & (sx >= ox.clamp(min=0)) & (sx <= (w - 1) + ox.clamp(max=0)))
        index = torch.where(valid, sx.add_(sy, alpha=w), float(h * w)).long().view(n, 1, h * w)
        # outside pixels read a zero appended after each image
        flat = torch.cat([images.reshape(n, c, h * w), images.new_zeros(n, c, 1)], dim=2)
        return flat.gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def torch_transform(mean: tuple[float, ...], std: tuple[float, ...], size: int | None,
                    train: bool):
    """The per-sample torchvision pipeline of the reference code (for ``loader="torch"``).

    ``size`` None (images read from disk) crops at each image's own size."""
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if train:
        crop = v2.RandomCrop(size, padding=4) if size else _OwnSizeCrop(4)
        steps += [crop, v2.RandomHorizontalFlip(), v2.RandomRotation(15)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class _OwnSizeCrop(torch.nn.Module):
    """RandomCrop(padding) at the input's own size."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.padding = padding

    def forward(self, image):
        from torchvision.transforms import v2

        return v2.RandomCrop(image.shape[-2:], padding=self.padding)(image)


# -- the device-resident loader --------------------------------------------------------------
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
