"""Where datasets live: the data root, the cache, and how each source is found or downloaded.

A source is a file or folder the user put somewhere (a CIFAR tarball, an image folder or a
.zip of one); this module finds it and lists its images without decoding them.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import torch
from filelock import FileLock

DATASETS = ("synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder")
FOLDER_DATASETS = ("imagefolder", "tinyimagenet")


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says where to put the files."""


def data_root(data_dir: str | None) -> Path:
    """The folder (or, for imagefolder, the file) a dataset is looked for in: ``data_dir``,
    else TVLARS_DATA_DIR, else the user's cache folder."""
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def default_data_dir() -> Path:
    return Path(os.environ.get("TVLARS_DATA_DIR") or cache_dir() / "data")


def cache_dir() -> Path:
    """Decoded and extracted datasets: TVLARS_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("TVLARS_CACHE_DIR"):
        return Path(os.environ["TVLARS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tvlars_ray"


def missing(what: str, where: Path, fix: str) -> DataError:
    return DataError(f"{what} not found in {where} and it could not be downloaded: {fix}")


def imagefolder_needs_dir() -> DataError:
    return DataError("dataset imagefolder needs --data-dir pointing at a folder or .zip "
                     "holding train/<class>/ and test/<class>/ images")


# -- CIFAR: torchvision's reader, which downloads the tarball where it can --------------------
def cifar_arrays(ds: str, root: Path):
    """Both splits of CIFAR-10/100 as (uint8 NCHW images, int64 labels, class names)."""
    import torchvision  # heavy: only CIFAR needs it here

    cls = torchvision.datasets.CIFAR10 if ds == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{ds}.lock")):
        try:
            sets = [cls(str(root), train=train, download=True) for train in (True, False)]
        except Exception as exc:  # torchvision raises URLError, RuntimeError, ... offline
            archive = cls.filename
            raise missing(ds, root, f"put {archive} (from {cls.url}) into {root} or point "
                          f"--data-dir / TVLARS_DATA_DIR at a folder holding it ({exc})") from None
    return [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
             torch.tensor(s.targets, dtype=torch.int64), tuple(s.classes)) for s in sets]


# -- image folders (train/<class>/, test/<class>/) and zips of them -----------------------------
def find_tinyimagenet(root: Path) -> Path:
    for candidate in (root / "tinyimagenet", root / "tinyimagenet.zip",
                      root / "tiny-imagenet-200", root):
        if (candidate / "train").is_dir() or candidate.suffix == ".zip" and candidate.exists():
            return candidate
    raise missing("tinyimagenet", root,
                  f"put the prepared folder (train/<class>/, test/<class>/) or its .zip at "
                  f"{root / 'tinyimagenet'}[.zip], or point --data-dir at its parent")


def existing(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise missing("image folder", path.parent,
                      f"expected {path} to be a folder or .zip with train/<class>/ and "
                      f"test/<class>/ images")
    return path


def folder_source(ds: str, data_dir: str | None) -> Path:
    """The folder or zip an image-folder dataset is read from."""
    if ds == "imagefolder" and not data_dir:
        raise imagefolder_needs_dir()
    root = data_root(data_dir)
    return find_tinyimagenet(root) if ds == "tinyimagenet" else existing(root)


def list_images(path: Path) -> tuple[dict[str, list[tuple[str, str]]], object]:
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


def no_images(path: Path, split: str) -> DataError:
    return DataError(f"{path} has no images under {split}/<class>/: expected "
                     f"train/<class>/*.jpg and test/<class>/*.jpg")


def source_key(path: Path) -> str:
    """Names the cache of a source: changes when the source's path, size or mtime does."""
    stat = path.stat()
    return hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def imagefolder_dir(path: Path) -> Path:
    """A folder holding train/ and test/: the folder itself, or a zip extracted once."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return path
    target = cache_dir() / "extracted" / f"{path.stem}-{source_key(path)}"
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
