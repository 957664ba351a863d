"""The pre-start check: refuse, before Ray starts, any dataset a trial could not read.

It reads the data the way the trial will. A set the trial holds in memory (``loader
device``, Barlow Twins mode, CIFAR) must have images of one size (from a seeded sample of
each split) and fit in memory (its decoded size against the memory available here, and a
GPU's when the trial uses GPUs and this machine has one); it is then decoded into the cache
now, every image and archive member read once: the work the trial's first step would do
anyway, so it costs nothing later. A set the trial streams from disk (``loader torch``) has
its layout listed and a seeded sample of each split decoded: reading all of ImageNet before
starting would take longer than an epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .cifar import CIFAR, find_cifar
from .decode import decoded, mixed_sizes, survey
from .loaders import streams_from_disk
from .sources import FOLDER_DATASETS, DataError, data_root, find_layout

MEMORY_SHARE = 0.8  # of the memory available here, the most a decoded set may take
DEVICE_SHARE = 0.5  # of a GPU's memory, the most the images may take (the rest: the model)


def ensure_available(ds: str, data_dir: str | None) -> None:
    """Fail now, with the fix, if a dataset is missing or laid out in a way no trial could
    read (downloading it where that works). Decodes no image."""
    if ds in CIFAR:
        find_cifar(ds, data_root(data_dir))
    elif ds in FOLDER_DATASETS:
        find_layout(ds, data_dir)


def check_trials(trials: Iterable[Any]) -> None:
    """Read every dataset the trials need the way they will read it, once per dataset and
    way; the first that cannot be read raises a DataError naming the file and the fix."""
    seen = set()
    for cfg in trials:
        key = (cfg.ds, cfg.data_dir, streams_from_disk(cfg), cfg.mode, cfg.use_gpu,
               cfg.train_subset, cfg.test_subset)
        if key not in seen:
            seen.add(key)
            check_trial(cfg)


def check_trial(cfg: Any) -> None:
    """One trial's data (``cfg``: its settings, as for ``build_loaders``, with ``mode`` and
    ``use_gpu``)."""
    if cfg.ds == "synthetic":
        return
    if streams_from_disk(cfg):
        survey(find_layout(cfg.ds, cfg.data_dir))
        return
    if cfg.ds in FOLDER_DATASETS:
        layout = find_layout(cfg.ds, cfg.data_dir)
        sizes = survey(layout)
        if len(sizes) > 1:
            raise mixed_sizes(layout, sizes, _one_size_fix(cfg))
        (width, height), = sizes
        _check_fits(cfg, layout.path, len(layout.train), len(layout.test), 3 * width * height)
    decoded(cfg.ds, cfg.data_dir)


def _one_size_fix(cfg: Any) -> str:
    if cfg.mode == "bt":
        return ("Barlow Twins mode (mode bt) reads images through the device loader, which "
                "needs one size: resize them to one size first, or train mode clf with "
                "--set loader=torch")
    return ("loader device needs one size: stream them with --set loader=torch "
            "(RandomResizedCrop(224) to train, Resize(256) + CenterCrop(224) to test)")


def _check_fits(cfg: Any, path: Path, n_train: int, n_test: int, image_bytes: int) -> None:
    """The decoded set fits in memory here, and this trial's subsets in a GPU's memory."""
    fix = ("Barlow Twins mode (mode bt) needs the set in memory: use a smaller set"
           if cfg.mode == "bt" else "stream it from disk with --set loader=torch")
    total = (n_train + n_test) * image_bytes
    available = available_memory()
    if total > MEMORY_SHARE * available:
        raise DataError(f"{path}: {n_train + n_test} images decode to {_size(total)}, more "
                        f"than {MEMORY_SHARE:.0%} of the {_size(available)} of memory "
                        f"available here (loader device holds the whole set in memory): {fix}")
    if cfg.use_gpu and torch.cuda.is_available():
        used = (min(n_train, cfg.train_subset or n_train)
                + min(n_test, cfg.test_subset or n_test)) * image_bytes
        gpu = torch.cuda.get_device_properties(0).total_memory
        if used > DEVICE_SHARE * gpu:
            raise DataError(f"{path}: the trial's images take {_size(used)} on each GPU, "
                            f"more than {DEVICE_SHARE:.0%} of its {_size(gpu)} (the rest is "
                            f"for the model): {fix}")


def available_memory() -> int:
    """Bytes of memory available to a new process here (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
