"""LAMB: Adam moments with a layer-wise trust ratio (You et al., 2019).

For each parameter tensor ``w`` with gradient ``g``::

    m = b1 * m + (1 - b1) * g          v = b2 * v + (1 - b2) * g * g
    u = m_hat / (sqrt(v_hat) + eps)    (m_hat, v_hat bias-corrected only with bias_correction)
    u = u + weight_decay * w           (skipped for 1-D tensors with exclude_1d)
    r = min(||w||, weight_norm_clip) / ||u||   (1 if a norm is 0, or a 1-D tensor is excluded)
    w = w - lr * r * u
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..bounds import check
from ._kernels import (
    Workspace,
    blocked,
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

__all__ = ["LAMB", "lamb"]


class LAMB(LayerwiseOptimizer):
    """LAMB; ``last_trust_ratios`` holds the last step's per-tensor ``r``.

    Args:
        params: parameters or param groups; each group may override any hyper-parameter.
        lr: global learning rate.
        betas: decay rates of the first and second moment, each in [0, 1).
        eps: added to ``sqrt(v_hat)`` for stability.
        weight_decay: decoupled (AdamW-style) decay, added to the update before the ratio.
        weight_norm_clip: cap on ``||w||`` in the ratio; ``None`` disables it.
        bias_correction: Adam's bias correction of the moments; off by default.
        exclude_1d: leave tensors with ``ndim <= 1`` out of weight decay and adaptation.
        foreach: multi-tensor kernels (``None`` or ``True``) or the per-tensor loop (``False``).
    """

    state_buffers = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        weight_norm_clip: float | None = 10.0,
        bias_correction: bool = False,
        exclude_1d: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            weight_norm_clip=weight_norm_clip,
            bias_correction=bias_correction,
            exclude_1d=exclude_1d,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check("lr", group["lr"])
        check("eps", group["eps"])
        check("weight_decay", group["weight_decay"], key="wd")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        check("betas[0]", betas[0], key="beta")
        check("betas[1]", betas[1], key="beta")
        check("weight_norm_clip", group["weight_norm_clip"], key="norm_clip")

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[Tensor],
    ) -> list[RatioChunk]:
        exp_avgs, exp_avg_sqs = buffers
        beta1, beta2 = group["betas"]
        return lamb(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            weight_norm_clip=group["weight_norm_clip"],
            bias_correction=group["bias_correction"],
            exclude_1d=group["exclude_1d"],
            foreach=group["foreach"],
            workspace=self._workspace,
        )


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_norm_clip: float | None,
    bias_correction: bool,
    exclude_1d: bool,
    foreach: bool | None = None,
    workspace: Workspace | None = None,
) -> list[RatioChunk]:
    """Functional LAMB step; returns the trust ratios of the adapted tensors and their
    norms ``||w||``, ``||u||``.

    ``workspace`` holds the temporaries of the multi-tensor path between steps.
    """
    hp = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        weight_norm_clip=weight_norm_clip,
        bias_correction=bias_correction,
        exclude_1d=exclude_1d,
    )
    tensors = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if foreach is False:
        return _single_tensor_lamb(*tensors, **hp)
    return _multi_tensor_lamb(*tensors, **hp, workspace=workspace or Workspace())


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_norm_clip: float | None,
    bias_correction: bool,
    exclude_1d: bool,
) -> list[RatioChunk]:
    """Reference path: one parameter at a time, as the formulas read."""
    local: list[int] = []
    ratios: list[Tensor] = []
    norm_pairs: list[Tensor] = []
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        step.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if bias_correction:
            t = step.to(scalar_dtype(p.dtype))
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        else:
            m_hat, v_hat = m, v
        u = m_hat / (v_hat.sqrt() + eps)
        if is_excluded(p, exclude_1d):
            p.add_(u, alpha=-lr)
            continue
        if weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        pair = pair_norms(p, u)
        r = trust_ratio(pair, 1.0, weight_norm_clip, None).view(())
        p.addcmul_(u, r, value=-lr)
        local.append(i)
        ratios.append(r)
        norm_pairs.append(pair)
    if not ratios:
        return []
    return [RatioChunk(local, torch.stack(ratios), torch.cat(norm_pairs, dim=1))]


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_norm_clip: float | None,
    bias_correction: bool,
    exclude_1d: bool,
    workspace: Workspace,
) -> list[RatioChunk]:
    """Fast path: a few multi-tensor kernels per (device, dtype) bucket.

    On CPU the bucket is walked in cache-sized runs of tensors (``chunks``) and ``u`` lives
    in the reused ``workspace``. Bias correction is folded into the denominator,
    ``sqrt(v) * c1 / sqrt(c2) + eps * c1`` with ``c = 1 - beta^t`` per tensor, which gives
    ``m_hat / (sqrt(v_hat) + eps)`` for the cost of one extra pass.
    """
    out: list[RatioChunk] = []
    for bucket in group_by_device_and_dtype(params):
        p_all, g_all = pick(params, bucket), pick(grads, bucket)
        m_all, v_all = pick(exp_avgs, bucket), pick(exp_avg_sqs, bucket)
        s_all = pick(steps, bucket)
        torch._foreach_add_(s_all, 1)
        denominator: tuple[Tensor, Tensor] | None = None  # (scale, offset) per tensor
        if bias_correction:
            t = torch.stack(s_all).to(scalar_dtype(p_all[0].dtype))
            c1 = 1 - beta1**t
            denominator = c1 / (1 - beta2**t).sqrt(), c1 * eps
        for run in chunks(p_all):
            p_run, g_run = pick(p_all, run), pick(g_all, run)
            m_run, v_run = pick(m_all, run), pick(v_all, run)
            torch._foreach_lerp_(m_run, g_run, 1 - beta1)
            torch._foreach_mul_(v_run, beta2)
            torch._foreach_addcmul_(v_run, g_run, g_run, value=1 - beta2)
            if denominator is None:
                u = _adam_direction(m_run, v_run, None, eps, workspace)
            else:
                scale, offset = (x[run.start : run.stop].unbind(0) for x in denominator)
                u = _adam_direction(m_run, v_run, scale, offset, workspace)

            adapted, excluded = split_adapted(p_run, exclude_1d)
            if excluded:
                torch._foreach_add_(pick(p_run, excluded), pick(u, excluded), alpha=-lr)
            if adapted:
                p_ad, u_ad = pick(p_run, adapted), pick(u, adapted)
                if weight_decay != 0:
                    torch._foreach_add_(u_ad, p_ad, alpha=weight_decay)
                norms = foreach_norms(p_ad, u_ad)
                r = trust_ratio(norms, 1.0, weight_norm_clip, None)
                torch._foreach_addcmul_(p_ad, u_ad, r.unbind(0), value=-lr)
                out.append(RatioChunk([bucket[run[k]] for k in adapted], r, norms))
    return out


def _adam_direction(
    m: list[Tensor],
    v: list[Tensor],
    scale: Sequence[Tensor] | None,
    offset: float | Sequence[Tensor],
    workspace: Workspace,
) -> list[Tensor]:
    """``m / (sqrt(v) * scale + offset)`` as new tensors (``scale``, ``offset``: per tensor).

    On CPU each result is computed straight into the workspace, one tensor at a time: the
    multi-tensor ops have no ``out=`` form, and a copy first would cost an extra pass.
    """
    in_workspace = blocked(m[0])
    if in_workspace:
        u = workspace.like(v)
        for u_i, v_i in zip(u, v):
            torch.sqrt(v_i, out=u_i)
    else:
        u = list(torch._foreach_sqrt(v))
    if scale is not None:
        torch._foreach_mul_(u, scale)
    torch._foreach_add_(u, offset)
    if not in_workspace:
        return list(torch._foreach_div(m, u))
    for u_i, m_i in zip(u, m):
        torch.div(m_i, u_i, out=u_i)
    return u
