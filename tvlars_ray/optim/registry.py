"""Name -> optimizer registry: what the project knows about each optimizer, in one place.

Each entry is a frozen :class:`OptimizerSpec` (as timm's ``OptimInfo``): the class, the name a
report shows, a one-line description, and which TrialConfig settings apply to it. The config
derives from it which settings cannot matter for a trial and its help text, and the report
its method names; :func:`build_optimizer` turns a spec, a model and a config into a ready
optimizer. A new optimizer is one :func:`register_optimizer` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry is read without torch (the CLI's help, the config)
    from torch import nn
    from torch.optim import Optimizer

__all__ = [
    "COMMON_SETTINGS",
    "PHI_SETTINGS",
    "OptimizerSpec",
    "available_optimizers",
    "build_optimizer",
    "get_spec",
    "optimizer_settings",
    "register_optimizer",
]

# TrialConfig settings every optimizer takes (as ``lr`` and ``weight_decay``).
COMMON_SETTINGS = ("lr", "wd")
# The settings of TVLARS's phi(t) (the arguments of ``tvlars_phi`` beyond t).
PHI_SETTINGS = ("lmbda", "alpha", "delay", "gamma_min")


@dataclass(frozen=True)
class OptimizerSpec:
    """What is known about one optimizer.

    Attributes:
        name: registry key, the value of the ``opt`` setting.
        optimizer: the optimizer class, or where to import it from (``"module:Class"``, so
            that reading the registry does not import torch); called as
            ``cls(params, lr=..., weight_decay=..., ...)``.
        display: the name a report shows ("TVLARS").
        description: one line for the help text.
        settings: TrialConfig settings that apply to it beyond ``COMMON_SETTINGS``, each
            passed as the keyword argument of the same name; the others cannot change its
            numbers.
        has_betas: has Adam-style ``betas``.
        lars_family: keeps per-layer trust ratios (``last_trust_ratios``); these get all
            parameters in one group and skip 1-D tensors themselves (``exclude_1d``), while
            torch's optimizers get 1-D tensors in a group without weight decay.
        defaults: fixed keyword arguments, passed before those from the config.
    """

    name: str
    optimizer: type[Optimizer] | str
    display: str
    description: str
    settings: tuple[str, ...] = ()
    has_betas: bool = False
    lars_family: bool = False
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def cls(self) -> type[Optimizer]:
        """The optimizer class, imported on first use."""
        if not isinstance(self.optimizer, str):
            return self.optimizer
        module, _, name = self.optimizer.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def has_momentum(self) -> bool:
        return "momentum" in self.settings


_SPECS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` under its name; ``ValueError`` if the name is taken or not lower case."""
    if spec.name != spec.name.lower() or spec.name in _SPECS:
        raise ValueError(f"optimizer name {spec.name!r} is taken or not lower case")
    _SPECS[spec.name] = spec
    return spec


for _spec in (
    OptimizerSpec("sgd", "torch.optim:SGD", "SGD", "stochastic gradient descent with "
                  "heavy-ball momentum", settings=("momentum",)),
    OptimizerSpec("adam", "torch.optim:Adam", "Adam", "Adam, weight decay added to the "
                  "gradient", has_betas=True),
    OptimizerSpec("adamw", "torch.optim:AdamW", "AdamW", "Adam with decoupled weight decay",
                  has_betas=True),
    OptimizerSpec("adagrad", "torch.optim:Adagrad", "Adagrad", "per-coordinate steps "
                  "shrinking with the summed squared gradients"),
    OptimizerSpec("rmsprop", "torch.optim:RMSprop", "RMSprop", "steps scaled by a running "
                  "mean of squared gradients"),
    OptimizerSpec("lars", "tvlars_ray.optim.lars:LARS", "LARS", "layer-wise adaptive rate "
                  "scaling with momentum (You et al., 2017)", settings=("momentum", "eta"),
                  lars_family=True),
    OptimizerSpec("tvlars", "tvlars_ray.optim.tvlars:TVLARS", "TVLARS", "LARS with its trust "
                  "ratio scaled by a decaying phi(t) in place of warm-up (Do et al., 2024)",
                  settings=("momentum", "eta", *PHI_SETTINGS, "norm_clip"), lars_family=True),
    OptimizerSpec("lamb", "tvlars_ray.optim.lamb:LAMB", "LAMB", "Adam moments with a "
                  "layer-wise trust ratio (You et al., 2019)", has_betas=True,
                  lars_family=True),
):
    register_optimizer(_spec)


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


def optimizer_settings() -> frozenset[str]:
    """The settings some optimizer takes and others do not (``settings`` of any spec)."""
    return frozenset(name for spec in _SPECS.values() for name in spec.settings)


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
    kwargs.update({name: getattr(cfg, name) for name in spec.settings})
    kwargs.update(lr=cfg.lr, weight_decay=cfg.wd)
    if spec.lars_family:
        params: Any = [p for p in model.parameters() if p.requires_grad]
    else:
        params = param_groups_weight_decay(model, cfg.wd)
    return spec.cls(params, **kwargs)
