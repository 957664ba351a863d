"""TVLARS: LARS whose trust ratio is scaled by a time-varying factor ``phi(t)``.

``phi(t) = 1 / (alpha + exp(lmbda * (t - delay))) + gamma_min`` is close to ``1 / alpha`` while
``t`` is well before ``delay`` (a strong, exploratory layer-wise scaling that replaces warm-up),
``1 / (1 + alpha)`` at ``t = delay``, and decays to ``gamma_min`` after. Both norms in the ratio
can be capped at ``norm_clip``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..bounds import check
from ._kernels import scalar_dtype
from .base import LayerwiseOptimizer, RatioChunk
from .lars import LARS, PhiFn, lars, lars_args

__all__ = ["TVLARS", "tvlars_phi"]


@overload
def tvlars_phi(
    t: float, lmbda: float, alpha: float = ..., delay: float = ..., gamma_min: float = ...
) -> float: ...
@overload
def tvlars_phi(
    t: Tensor, lmbda: float, alpha: float = ..., delay: float = ..., gamma_min: float = ...
) -> Tensor: ...
def tvlars_phi(
    t: float | Tensor,
    lmbda: float,
    alpha: float = 0.1,
    delay: float = 0.0,
    gamma_min: float = 0.0,
) -> float | Tensor:
    """``1 / (alpha + exp(lmbda * (t - delay))) + gamma_min``, finite for every ``t``.

    Evaluated as ``sigmoid(log(alpha) - lmbda * (t - delay)) / alpha + gamma_min``: the same
    value, but the logistic function saturates at 0 where ``exp`` would overflow. A tensor
    ``t`` is evaluated on its own device in a few small kernels.
    """
    check("alpha", alpha)
    shift = math.log(alpha)
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        y = (t - delay).mul_(-lmbda).add_(shift)
        return y.sigmoid_().div_(alpha).add_(gamma_min)
    y = shift - lmbda * (float(t) - delay)
    if y >= 0:
        logistic = 1.0 / (1.0 + math.exp(-y))
    else:
        e = math.exp(y)
        logistic = e / (1.0 + e)
    return logistic / alpha + gamma_min


class TVLARS(LayerwiseOptimizer):
    """Time-varying LARS: ``q = eta * phi(t) * clip(||w||) / clip(||d||)``.

    Everything else is LARS (see :class:`~tvlars_ray.optim.LARS`; both step through
    :func:`~tvlars_ray.optim.lars.lars`). ``t`` is the step number kept per parameter in
    ``state['step']`` (1 on the first update), ``delay`` is counted in steps, and
    ``norm_clip=None`` disables the cap. Besides ``last_trust_ratios`` it keeps
    ``last_phi``: phi of the last step for the first param group, a 0-d tensor on the device.
    """

    state_buffers = LARS.state_buffers

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lmbda: float = 0.001,
        alpha: float = 0.1,
        delay: float = 0,
        gamma_min: float = 0.0,
        norm_clip: float | None = 10.0,
        exclude_1d: bool = True,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            lmbda=lmbda,
            alpha=alpha,
            delay=delay,
            gamma_min=gamma_min,
            norm_clip=norm_clip,
            exclude_1d=exclude_1d,
            foreach=foreach,
        )
        self.last_phi: Tensor | None = None
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        LARS._validate(group)
        for name in ("lmbda", "alpha", "delay", "gamma_min", "norm_clip"):
            check(name, group[name])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_phi", None)

    def _phi(self, group: dict[str, Any]) -> PhiFn:
        return functools.partial(
            tvlars_phi,
            lmbda=group["lmbda"],
            alpha=group["alpha"],
            delay=group["delay"],
            gamma_min=group["gamma_min"],
        )

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[Tensor],
    ) -> list[RatioChunk]:
        (momentum_buffers,) = buffers
        return lars(params, grads, momentum_buffers, steps, **lars_args(group),
                    phi=self._phi(group), norm_clip=group["norm_clip"],
                    workspace=self._workspace)

    def _observe(self, group: dict[str, Any], param: Tensor, step: Tensor) -> None:
        self.last_phi = self._phi(group)(step.to(scalar_dtype(param.dtype)))
