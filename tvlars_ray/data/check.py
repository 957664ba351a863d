"""The pre-start check: refuse, before Ray starts, any dataset a trial could not read.

It reads the data the way the trial will: a set the trial holds in memory is decoded into
the cache now (every image and archive member read once: the work the trial's first step
would do anyway, so it costs nothing later); a set the trial streams from disk has its
layout listed and a seeded sample of each split decoded (reading all of ImageNet before
starting would take longer than an epoch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .cifar import CIFAR, find_cifar
from .decode import decoded, survey
from .loaders import streams_from_disk
from .sources import FOLDER_DATASETS, data_root, find_layout


def ensure_available(ds: str, data_dir: str | None) -> None:
    """Fail now, with the fix, if a dataset is missing or laid out in a way no trial could
    read (downloading it where that works). Decodes no image."""
    if ds in CIFAR:
        find_cifar(ds, data_root(data_dir))
    elif ds in FOLDER_DATASETS:
        find_layout(ds, data_dir)


def check_trials(trials: Iterable[Any]) -> None:
    """Read every dataset the trials need the way they will read it, once per dataset and
    way; the first that cannot be read raises a DataError naming the file."""
    seen = set()
    for cfg in trials:
        key = (cfg.ds, cfg.data_dir, streams_from_disk(cfg))
        if key not in seen:
            seen.add(key)
            check_trial(cfg)


def check_trial(cfg: Any) -> None:
    """One trial's data (``cfg``: its settings, as for ``build_loaders``)."""
    if cfg.ds == "synthetic":
        return
    if streams_from_disk(cfg):
        survey(find_layout(cfg.ds, cfg.data_dir))
    else:
        decoded(cfg.ds, cfg.data_dir)
