"""CIFAR-10 and CIFAR-100 read from their official tarballs, without torchvision or a network.

The data folder holds ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (or the
folder they extract to); only when neither is there is the tarball downloaded (torchvision's
own ``download=True`` fails offline even with the tarball in place). The tarball holds
pickled batches: ``data`` (N x 3072 uint8, channel-major 32x32) and the labels.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np
from filelock import FileLock

from .sources import DataError, missing


@dataclass(frozen=True)
class CifarFormat:
    archive: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels: str
    names: str
    url: str
    md5: str


CIFAR = {
    "cifar10": CifarFormat("cifar-10-python.tar.gz", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           "batches.meta", "labels", "label_names",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           "c58f30108f718f92721af3b95e74349a"),
    "cifar100": CifarFormat("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",),
                            "meta", "fine_labels", "fine_label_names",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85"),
}


def find_cifar(ds: str, root: Path) -> Path:
    """The tarball (or its extracted folder) in ``root``, downloaded there if neither is."""
    fmt = CIFAR[ds]
    if root.name == fmt.archive and root.is_file():
        return root.resolve()
    for candidate in (root / fmt.archive, root / fmt.folder):
        if candidate.exists():
            return candidate.resolve()
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    lock = root / f".{ds}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if not (root / fmt.archive).exists():
                _download(fmt, root)
    except (OSError, ValueError) as exc:  # offline: URLError is an OSError
        if created:  # leave no empty folders behind a failed download
            lock.unlink(missing_ok=True)
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise missing(ds, root, f"put {fmt.archive} (from {fmt.url}) into {root} or point "
                      f"--data-dir / TVLARS_DATA_DIR at a folder holding it ({exc})") from None
    return (root / fmt.archive).resolve()


def _download(fmt: CifarFormat, root: Path) -> None:
    """Into a temporary name, checked, then renamed: a broken download leaves no tarball."""
    part = root / f"{fmt.archive}.part"
    digest = hashlib.md5()
    with urlopen(fmt.url, timeout=60) as response, part.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != fmt.md5:
        part.unlink()
        raise ValueError(f"the download of {fmt.url} does not match its published checksum")
    part.rename(root / fmt.archive)


def read_cifar(ds: str, source: Path):
    """(train images, train labels, test images, test labels, class names) as numpy arrays,
    images uint8 (N, 3, 32, 32); a damaged or incomplete source is a DataError naming it."""
    fmt = CIFAR[ds]
    files = _members(fmt, source)
    meta = _unpickle(source, fmt.meta, files[fmt.meta])
    classes = tuple(meta.get(fmt.names) or ())
    if not classes:
        raise DataError(f"{source}: member '{fmt.meta}' has no '{fmt.names}'")
    out = []
    for names in (fmt.train, fmt.test):
        images, labels = [], []
        for name in names:
            batch = _unpickle(source, name, files[name])
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                label = np.asarray(batch[fmt.labels], dtype=np.int64)
            except (KeyError, ValueError) as exc:
                raise DataError(f"{source}: member '{name}' is not a CIFAR batch ({exc!r})"
                                ) from None
            if len(label) != len(data) or len(label) and not 0 <= label.min() <= label.max() \
                    < len(classes):
                raise DataError(f"{source}: member '{name}' has {len(data)} images and "
                                f"{len(label)} labels in 0..{len(classes) - 1}: it is damaged")
            images.append(data)
            labels.append(label)
        out += [np.concatenate(images), np.concatenate(labels)]
    return (*out, classes)


def _members(fmt: CifarFormat, source: Path) -> dict[str, bytes]:
    """The batches and the meta file, by name, from the tarball (read once, in order) or the
    extracted folder."""
    wanted = (*fmt.train, *fmt.test, fmt.meta)
    if source.is_dir():
        found = {name: (source / name).read_bytes() for name in wanted
                 if (source / name).is_file()}
    else:
        found, current = {}, "(the start)"
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    current = member.name
                    folder, _, name = member.name.lstrip("./").rpartition("/")
                    if folder == fmt.folder and name in wanted and member.isfile():
                        found[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{source} is not a readable tar archive (at member '{current}': "
                            f"{exc}): it is truncated or damaged; download it again") from None
    lost = [name for name in wanted if name not in found]
    if lost:
        raise DataError(f"{source} lacks {', '.join(f'{fmt.folder}/{n}' for n in lost)}: "
                        f"expected the official {fmt.archive} (from {fmt.url})")
    return found


def _unpickle(source: Path, name: str, blob: bytes) -> dict:
    try:
        value = pickle.loads(blob, encoding="latin1")  # the official batches: Python 2 pickles
    except Exception as exc:  # a damaged pickle raises any of a dozen types
        raise DataError(f"{source}: member '{name}' cannot be unpickled ({exc!r})") from None
    if not isinstance(value, dict):
        raise DataError(f"{source}: member '{name}' is not a CIFAR batch")
    return value
