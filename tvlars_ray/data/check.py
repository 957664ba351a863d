"""The pre-start check: every dataset a trial needs is there and readable before Ray starts."""

from __future__ import annotations

from .sources import (
    FOLDER_DATASETS,
    cifar_arrays,
    data_root,
    folder_source,
    list_images,
    no_images,
)


def ensure_available(ds: str, data_dir: str | None) -> None:
    """Fail now, with the fix, if a dataset is missing (downloading it where that works)."""
    if ds == "synthetic":
        return
    if ds in ("cifar10", "cifar100"):
        cifar_arrays(ds, data_root(data_dir))
    elif ds in FOLDER_DATASETS:
        source = folder_source(ds, data_dir)
        if ds == "imagefolder":
            splits, _ = list_images(source)
            for split, items in splits.items():
                if not items:
                    raise no_images(source, split)
