"""Where datasets live, and which images make each split of a source, read without decoding.

A source is what the user put somewhere: an image folder or a .zip of one, in torchvision's
ImageFolder layout (``test/`` or, for ImageNet, ``val/`` beside ``train/``) or in Tiny
ImageNet's official one (CIFAR's tarballs: see ``cifar``).
This module resolves the data root (once, in :func:`data_root`), finds each dataset's source
and lists its layout: the (member, label) pairs of each split. Anything the trial could not
read this way is refused here, naming the file, and the member inside an archive.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DATASETS = ("synthetic", "cifar10", "cifar100", "tinyimagenet", "imagenet", "imagefolder")
FOLDER_DATASETS = ("imagefolder", "tinyimagenet", "imagenet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(UserError, RuntimeError):
    """A dataset that cannot be found or read; the message says where to put the files."""


def data_root(data_dir: str | None) -> Path:
    """The folder (or, for imagefolder, the file) a dataset is looked for in: ``data_dir``,
    else TVLARS_DATA_DIR, else the user's cache folder."""
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def default_data_dir() -> Path:
    return Path(os.environ.get("TVLARS_DATA_DIR") or cache_dir() / "data")


def cache_dir() -> Path:
    """Decoded datasets: TVLARS_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("TVLARS_CACHE_DIR"):
        return Path(os.environ["TVLARS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tvlars_ray"


def missing(what: str, where: Path, fix: str) -> DataError:
    return DataError(f"{what} not found in {where} and it could not be downloaded: {fix}")


# -- folders and zips ----------------------------------------------------------------------------
class Archive:
    """The files of a folder or a .zip, by relative name (``train/cat/1.jpg``).

    A zip that cannot be opened (truncated, not a zip) is refused when the Archive is made; a
    member that cannot be read (a bad checksum, damaged compressed data) when it is read, the
    error naming the member. Each process opens the zip for itself: DataLoader processes
    must not share one file handle.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._pid = 0
        if self.is_zip:
            self._handle()

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{self.path} is not a readable .zip archive ({exc}): it is "
                                f"truncated or damaged; copy or download it again") from None
            self._pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}

    def names(self) -> list[str]:
        if self.is_zip:
            return [n for n in self._handle().namelist() if not n.endswith("/")]
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                      if p.is_file())

    def read(self, name: str) -> bytes:
        try:
            if self.is_zip:
                return self._handle().read(name)
            return (self.path / name).read_bytes()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as exc:
            fix = "the archive is damaged; copy or download it again" if self.is_zip else \
                "replace or remove it"
            raise DataError(f"{self.where(name)} cannot be read ({exc}): {fix}") from None

    def where(self, name: str) -> str:
        """The member named for a message: the file, and the member inside an archive."""
        return f"{self.path}: member '{name}'" if self.is_zip else str(self.path / name)


@dataclass
class Layout:
    """Which images make each split of a source: (member, label) pairs, nothing decoded."""

    archive: Archive
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    @property
    def path(self) -> Path:
        return self.archive.path

    def split(self, name: str) -> list[tuple[str, int]]:
        return self.train if name == "train" else self.test


def _base(names: list[str], marker: str) -> str:
    """The folder a layout starts in: the top, or the one top folder holding ``marker``."""
    if any(n.startswith(marker) for n in names):
        return ""
    tops = {n.split("/", 1)[0] + "/" for n in names
            if "/" in n and n.split("/", 1)[1].startswith(marker)}
    return tops.pop() if len(tops) == 1 else ""


def class_folders(archive: Archive, test: str = "test") -> Layout:
    """``train/<class>/*`` and ``<test>/<class>/*`` (torchvision's ImageFolder layout per
    split), optionally inside one top folder; labels are the sorted train class names."""
    names = archive.names()
    base = _base(names, "train/")
    found: dict[str, list[tuple[str, str]]] = {"train": [], test: []}
    for name in names:
        parts = name[len(base):].split("/") if name.startswith(base) else []
        if len(parts) == 3 and parts[0] in found and parts[2].lower().endswith(IMAGE_SUFFIXES):
            found[parts[0]].append((name, parts[1]))
    for split, items in found.items():
        if not items:
            raise no_images(archive.path, split, test)
    classes = sorted({c for _, c in found["train"]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for _, c in found[test]} - set(index))
    if unknown:
        raise DataError(f"{archive.path}: {test}/ has classes missing from train/: {unknown}")
    splits = [sorted((index[c], name) for name, c in found[s]) for s in ("train", test)]
    return Layout(archive, tuple(classes), *([(name, label) for label, name in items]
                                             for items in splits))


def no_images(path: Path, split: str, test: str = "test") -> DataError:
    hint = ("; ImageNet's validation images must be sorted into class folders, as "
            "torchvision's ImageFolder expects" if split == "val" else "")
    return DataError(f"{path} has no images under {split}/<class>/: expected "
                     f"train/<class>/*.jpg and {test}/<class>/*.jpg{hint}")


def tiny_imagenet(archive: Archive) -> Layout:
    """Tiny ImageNet as downloaded (``tiny-imagenet-200.zip`` or its folder): classes from
    ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, and ``val/images/`` labelled by
    ``val/val_annotations.txt`` as the test split (the official ``test/`` has no labels and
    is ignored). A prepared ImageFolder layout (``train/<class>/``, ``test/<class>/``) too."""
    names = archive.names()
    present, base = set(names), _base(names, "train/")
    official = f"{base}wnids.txt" in present or f"{base}val/val_annotations.txt" in present or any(
        n.startswith(f"{base}train/") and n.count("/") == base.count("/") + 3 for n in names)
    if not official:
        return class_folders(archive)
    where = archive.path
    fix = "download tiny-imagenet-200.zip again (http://cs231n.stanford.edu/tiny-imagenet-200.zip)"
    if f"{base}wnids.txt" not in present:
        raise DataError(f"{where}: Tiny ImageNet layout without {base}wnids.txt: {fix}")
    wnids = sorted(set(archive.read(f"{base}wnids.txt").decode(errors="replace").split()))
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for name in names:
        parts = name[len(base):].split("/") if name.startswith(base) else []
        if (len(parts) == 4 and parts[0] == "train" and parts[2] == "images"
                and parts[3].lower().endswith(IMAGE_SUFFIXES)):
            if parts[1] not in index:
                raise DataError(f"{where}: train/{parts[1]}/ is not a class of wnids.txt: {fix}")
            train.append((index[parts[1]], name))
    empty = sorted(set(wnids) - {wnids[label] for label, _ in train})
    if empty:
        raise DataError(f"{where} has no images under train/{empty[0]}/images/ "
                        f"({len(empty)} of the {len(wnids)} classes in wnids.txt have none): {fix}")
    annotations = f"{base}val/val_annotations.txt"
    if annotations not in present:
        raise DataError(f"{where}: no {annotations}, which labels the validation images used "
                        f"as the test split: {fix}")
    test = []
    for n, line in enumerate(archive.read(annotations).decode(errors="replace").splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        member = f"{base}val/images/{fields[0]}"
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{archive.where(annotations)}, line {n}: expected "
                            f"'<file> TAB <wnid from wnids.txt> ...', got {line[:60]!r}: {fix}")
        if member not in present:
            raise DataError(f"{archive.where(annotations)}, line {n}: {fields[0]} is not in "
                            f"val/images/: {fix}")
        test.append((index[fields[1]], member))
    if not test:
        raise DataError(f"{archive.where(annotations)} lists no images: {fix}")
    return Layout(archive, tuple(wnids), *([(name, label) for label, name in sorted(items)]
                                           for items in (train, test)))


# -- finding each dataset --------------------------------------------------------------------
def folder_source(ds: str, data_dir: str | None) -> Path:
    """The folder or zip an image-folder dataset is read from."""
    if ds == "imagefolder" and not data_dir:
        raise DataError("dataset imagefolder needs --data-dir pointing at a folder or .zip "
                        "holding train/<class>/ and test/<class>/ images")
    root = data_root(data_dir)
    if ds == "tinyimagenet":
        return _find_tinyimagenet(root)
    if ds == "imagenet":
        return _find_imagenet(root)
    path = root.resolve()
    if not path.exists():
        raise missing("image folder", path.parent,
                      f"expected {path} to be a folder or .zip with train/<class>/ and "
                      f"test/<class>/ images")
    return path


def _find_tinyimagenet(root: Path) -> Path:
    for candidate in (root / "tinyimagenet", root / "tinyimagenet.zip",
                      root / "tiny-imagenet-200", root / "tiny-imagenet-200.zip", root):
        if (candidate.is_file() and candidate.suffix == ".zip") or (candidate / "train").is_dir():
            return candidate.resolve()
    raise DataError(f"tinyimagenet not found in {root}: put the official tiny-imagenet-200.zip "
                    f"(or the folder it extracts to), or a prepared folder or .zip named "
                    f"tinyimagenet (train/<class>/, test/<class>/), into {root}, or point "
                    f"--data-dir at it")


def _find_imagenet(root: Path) -> Path:
    for candidate in (root / "imagenet", root / "imagenet.zip", root):
        if (candidate.is_file() and candidate.suffix == ".zip") or (candidate / "train").is_dir():
            return candidate.resolve()
    raise DataError(f"imagenet not found in {root}: put ImageNet in torchvision's ImageFolder "
                    f"layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) at {root / 'imagenet'}, "
                    f"or point --data-dir at it")


def find_layout(ds: str, data_dir: str | None) -> Layout:
    """The layout of an image-folder dataset, refused unless a trial could read it."""
    return layout_at(ds, folder_source(ds, data_dir))


def layout_at(ds: str, path: Path) -> Layout:
    archive = Archive(path)
    if ds == "tinyimagenet":
        return tiny_imagenet(archive)
    return class_folders(archive, "val" if ds == "imagenet" else "test")
