"""Name -> optimizer registry, so a trial config can pick its optimizer by a string.

Each entry is a frozen :class:`OptimizerSpec`; :func:`build_optimizer` turns a spec, a model and
a config (anything with ``lr, wd, momentum, eta, lmbda, alpha, delay, gamma_min, norm_clip``)
into a ready optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["OptimizerSpec", "available_optimizers", "build_optimizer", "get_spec"]


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer.

    Attributes:
        name: registry key.
        cls: the optimizer class, called as ``cls(params, lr=..., weight_decay=..., ...)``.
        has_momentum: takes ``momentum`` from the config.
        has_betas: has Adam-style ``betas``.
        lars_family: keeps per-layer trust ratios (``last_trust_ratios``); these get all
            parameters in one group and skip 1-D tensors themselves (``exclude_1d``), while
            torch's optimizers get 1-D tensors in a group without weight decay.
        cfg_args: keyword arguments read from the config attribute of the same name.
        defaults: fixed keyword arguments, passed before those from the config.
    """

    name: str
    cls: type[Optimizer]
    has_momentum: bool = False
    has_betas: bool = False
    lars_family: bool = False
    cfg_args: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_TVLARS_ARGS = ("momentum", "eta", "lmbda", "alpha", "delay", "gamma_min", "norm_clip")

_SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", torch.optim.SGD, has_momentum=True, cfg_args=("momentum",)),
        OptimizerSpec("adam", torch.optim.Adam, has_betas=True),
        OptimizerSpec("adamw", torch.optim.AdamW, has_betas=True),
        OptimizerSpec("adagrad", torch.optim.Adagrad),
        OptimizerSpec("rmsprop", torch.optim.RMSprop),
        OptimizerSpec(
            "lars", LARS, has_momentum=True, lars_family=True, cfg_args=("momentum", "eta")
        ),
        OptimizerSpec(
            "tvlars", TVLARS, has_momentum=True, lars_family=True, cfg_args=_TVLARS_ARGS
        ),
        OptimizerSpec("lamb", LAMB, has_betas=True, lars_family=True),
    )
}


def available_optimizers() -> tuple[str, ...]:
    """All registry names, in a stable order."""
    return tuple(_SPECS)


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under ``name`` (case-insensitive); ``ValueError`` if unknown."""
    spec = _SPECS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(
            f"unknown optimizer {name!r}: choose one of {', '.join(available_optimizers())}"
        )
    return spec


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split as timm does: 1-D tensors (biases, norms) get no decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, model: nn.Module, cfg: Any) -> Optimizer:
    """Build optimizer ``name`` over ``model``'s trainable parameters, configured from ``cfg``."""
    spec = get_spec(name)
    kwargs: dict[str, Any] = dict(spec.defaults)
    kwargs.update({arg: getattr(cfg, arg) for arg in spec.cfg_args})
    kwargs.update(lr=cfg.lr, weight_decay=cfg.wd)
    if spec.lars_family:
        params: Any = [p for p in model.parameters() if p.requires_grad]
    else:
        params = param_groups_weight_decay(model, cfg.wd)
    return spec.cls(params, **kwargs)
