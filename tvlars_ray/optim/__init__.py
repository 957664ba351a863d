"""Optimizers for large-batch training: LARS, TVLARS, LAMB, and a registry that also serves
torch's SGD, Adam, AdamW, Adagrad and RMSprop by name."""

import importlib
from typing import Any

from .registry import (
    COMMON_SETTINGS,
    PHI_SETTINGS,
    OptimizerSpec,
    available_optimizers,
    build_optimizer,
    get_spec,
    optimizer_settings,
    register_optimizer,
)

# The optimizers import torch and the registry does not: the config and the CLI read what
# is known about each optimizer without paying for torch, and the classes load on first use.
_LAZY = {"LAMB": "lamb", "LARS": "lars", "TVLARS": "tvlars", "tvlars_phi": "tvlars"}

__all__ = [
    "COMMON_SETTINGS",
    "LAMB",
    "LARS",
    "PHI_SETTINGS",
    "TVLARS",
    "OptimizerSpec",
    "available_optimizers",
    "build_optimizer",
    "get_spec",
    "optimizer_settings",
    "register_optimizer",
    "tvlars_phi",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
