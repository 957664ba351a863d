"""LARS: layer-wise adaptive rate scaling (You et al., 2017), with heavy-ball momentum.

For each parameter tensor ``w`` with gradient ``g``::

    d  = g + weight_decay * w                      (1-D tensors with exclude_1d: d = g)
    q  = eta * ||w|| / ||d||   (1 if a norm is 0)  (1-D tensors with exclude_1d: q = 1)
    mu = momentum * mu + q * d
    w  = w - lr * mu

The update is written once, for both LARS and TVLARS (which only changes ``q``): a per-tensor
reference loop and a multi-tensor path built from ``torch._foreach_*`` kernels. Neither reads a
tensor value on the host, so ``step()`` never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..bounds import check
from ._kernels import (
    Workspace,
    add_scaled,
    chunks,
    foreach_norms,
    group_by_device_and_dtype,
    is_excluded,
    pair_norms,
    pick,
    scalar_dtype,
    split_adapted,
    trust_ratio,
)
from .base import LayerwiseOptimizer, RatioChunk

__all__ = ["LARS", "lars", "lars_args"]

PhiFn = Callable[[Tensor], Tensor]


class LARS(LayerwiseOptimizer):
    """LARS with momentum; ``last_trust_ratios`` holds the last step's per-tensor ``q``.

    Args:
        params: parameters or param groups; each group may override any hyper-parameter.
        lr: global learning rate.
        momentum: heavy-ball factor in [0, 1).
        weight_decay: L2 coefficient, added to the gradient before the trust ratio.
        eta: trust coefficient.
        exclude_1d: leave tensors with ``ndim <= 1`` (biases, norm weights) out of weight
            decay and adaptation, as in the LARS paper.
        foreach: multi-tensor kernels (``None`` or ``True``) or the per-tensor loop (``False``).
    """

    state_buffers = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        exclude_1d: bool = True,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            exclude_1d=exclude_1d,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check("lr", group["lr"])
        check("momentum", group["momentum"])
        check("weight_decay", group["weight_decay"], key="wd")
        check("eta", group["eta"])

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
                    workspace=self._workspace)


def lars_args(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`lars` that a LARS param group holds."""
    return {key: group[key]
            for key in ("lr", "momentum", "weight_decay", "eta", "exclude_1d", "foreach")}


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    exclude_1d: bool,
    foreach: bool | None = None,
    phi: PhiFn | None = None,
    norm_clip: float | None = None,
    workspace: Workspace | None = None,
) -> list[RatioChunk]:
    """Functional LARS/TVLARS step; returns the trust ratios of the adapted tensors and
    their norms ``||w||``, ``||d||``.

    ``phi`` maps the (float) step counters to a per-tensor factor on ``q`` and ``norm_clip``
    caps both norms; LARS passes neither. ``workspace`` holds the temporaries of the
    multi-tensor path between steps.
    """
    hp = dict(
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        eta=eta,
        exclude_1d=exclude_1d,
        phi=phi,
        norm_clip=norm_clip,
    )
    tensors = (params, grads, momentum_buffers, steps)
    if foreach is False:
        return _single_tensor_lars(*tensors, **hp)
    return _multi_tensor_lars(*tensors, **hp, workspace=workspace or Workspace())


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    exclude_1d: bool,
    phi: PhiFn | None,
    norm_clip: float | None,
) -> list[RatioChunk]:
    """Reference path: one parameter at a time, as the formulas read."""
    local: list[int] = []
    ratios: list[Tensor] = []
    norm_pairs: list[Tensor] = []
    for i, (p, g, buf, step) in enumerate(zip(params, grads, momentum_buffers, steps)):
        step.add_(1)
        buf.mul_(momentum)
        if is_excluded(p, exclude_1d):
            buf.add_(g)
        else:
            d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
            scale: float | Tensor = eta
            if phi is not None:
                scale = phi(step.to(scalar_dtype(p.dtype))).mul_(eta)
            pair = pair_norms(p, d)
            q = trust_ratio(pair, scale, norm_clip, norm_clip).view(())
            buf.addcmul_(d, q)
            local.append(i)
            ratios.append(q)
            norm_pairs.append(pair)
        p.add_(buf, alpha=-lr)
    if not ratios:
        return []
    return [RatioChunk(local, torch.stack(ratios), torch.cat(norm_pairs, dim=1))]


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    exclude_1d: bool,
    phi: PhiFn | None,
    norm_clip: float | None,
    workspace: Workspace,
) -> list[RatioChunk]:
    """Fast path: a few multi-tensor kernels per (device, dtype) bucket.

    Per adapted tensor the memory traffic is that of SGD with weight decay (one temporary
    ``d``, the momentum and parameter updates) plus two norm reads. On CPU the bucket is
    walked in cache-sized runs of tensors (``chunks``), so the norms and the updates find
    ``w`` and ``d`` still in cache, and ``d`` lives in the reused ``workspace``.
    """
    out: list[RatioChunk] = []
    for bucket in group_by_device_and_dtype(params):
        p_all, g_all = pick(params, bucket), pick(grads, bucket)
        b_all, s_all = pick(momentum_buffers, bucket), pick(steps, bucket)
        torch._foreach_add_(s_all, 1)
        adapted_all, _ = split_adapted(p_all, exclude_1d)
        scale: float | Tensor = eta
        if phi is not None and adapted_all:
            t = torch.stack(pick(s_all, adapted_all)).to(scalar_dtype(p_all[0].dtype))
            scale = phi(t).mul_(eta)
        done = 0  # adapted tensors handled so far: the offset into ``scale``
        for run in chunks(p_all):
            p_run, g_run, b_run = pick(p_all, run), pick(g_all, run), pick(b_all, run)
            torch._foreach_mul_(b_run, momentum)
            adapted, excluded = split_adapted(p_run, exclude_1d)
            if excluded:
                torch._foreach_add_(pick(b_run, excluded), pick(g_run, excluded))
            if adapted:
                n = len(adapted)
                p_ad, g_ad = pick(p_run, adapted), pick(g_run, adapted)
                d = add_scaled(g_ad, p_ad, weight_decay, workspace) if weight_decay else g_ad
                run_scale = scale if isinstance(scale, float) else scale[done : done + n]
                norms = foreach_norms(p_ad, d)
                q = trust_ratio(norms, run_scale, norm_clip, norm_clip)
                torch._foreach_addcmul_(pick(b_run, adapted), d, q.unbind(0))
                out.append(RatioChunk([bucket[run[k]] for k in adapted], q, norms))
                done += n
            torch._foreach_add_(p_run, b_run, alpha=-lr)
    return out
