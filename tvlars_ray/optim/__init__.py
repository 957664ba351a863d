"""Optimizers for large-batch training: LARS, TVLARS, LAMB, and a registry that also serves
torch's SGD, Adam, AdamW, Adagrad and RMSprop by name."""

from .lamb import LAMB
from .lars import LARS
from .registry import OptimizerSpec, available_optimizers, build_optimizer, get_spec
from .tvlars import TVLARS, tvlars_phi

__all__ = [
    "LAMB",
    "LARS",
    "TVLARS",
    "OptimizerSpec",
    "available_optimizers",
    "build_optimizer",
    "get_spec",
    "tvlars_phi",
]
