"""The per-layer history of a LARS-family optimizer: trust ratio, weight norm and update norm
of every adapted layer, every ``every`` optimizer steps (or at each epoch's last step).

The reference code appended these to Python lists with one host sync per parameter per step.
Here a step hook keeps references to the optimizer's device tensors (``last_trust_ratios``,
``last_norms``) and, on a due step, stacks them into one small device tensor; nothing waits
for the device until :meth:`LayerHistory.take` reads the whole epoch in one copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class LayerHistory:
    """Attached to one optimizer for one stage; ``take()`` once per epoch gives the rows."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                 every: int | None) -> None:
        self.optimizer, self.every = optimizer, every
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.layers: list[tuple[str, int]] | None = None  # (name, numel) in the ratios' order
        self.step = 0
        self.latest: tuple[int, float, torch.Tensor, torch.Tensor | None] | None = None
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.handle = optimizer.register_step_post_hook(self._after_step)

    @staticmethod
    def applies(optimizer: torch.optim.Optimizer) -> bool:
        """Only the LARS family has per-layer trust ratios to record."""
        return hasattr(optimizer, "last_trust_ratios")

    def start_epoch(self, steps_before: int) -> None:
        """Count steps from the stage's step counter (a resumed stage continues its count)."""
        self.step = steps_before
        self.latest = None
        self.pending = []

    def close(self) -> None:
        self.handle.remove()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        ratios = optimizer.last_trust_ratios
        if ratios is None:
            return
        if self.layers is None:
            self.layers = self._adapted_layers()
            if len(self.layers) != ratios.shape[0]:
                raise RuntimeError(f"{type(optimizer).__name__} reported {ratios.shape[0]} "
                                   f"trust ratios for {len(self.layers)} adapted parameters")
        lr = float(optimizer.param_groups[0]["lr"])
        norms = getattr(optimizer, "last_norms", None)
        # references only: the optimizer makes new tensors every step, nothing is copied here
        self.latest = (self.step, lr, ratios, norms)
        if self.every is not None and self.step % self.every == 0:
            self.pending.append(self._gather(*self.latest))

    def _gather(self, step: int, lr: float, ratios: torch.Tensor,
                norms: torch.Tensor | None) -> tuple[int, float, torch.Tensor]:
        """(3, n) on the device: ratio, ||w|| and the update direction's norm per layer."""
        if norms is None:  # an optimizer that keeps no norms: only the ratio is known
            norms = torch.full((2, ratios.shape[0]), math.nan, device=ratios.device)
        return step, lr, torch.cat([ratios.detach()[None], norms.detach().to(ratios.dtype)])

    def _adapted_layers(self) -> list[tuple[str, int]]:
        """The parameters the trust ratios belong to, in their order: every parameter that
        had a gradient, in group order, except the 1-D ones a group excludes from adaptation."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or (group.get("exclude_1d") and p.ndim <= 1):
                    continue
                out.append((self.names.get(id(p), f"param{len(out)}"), p.numel()))
        return out

    def take(self) -> dict[str, list] | None:
        """The epoch's rows as columns (step, layer, layer_index, numel, trust_ratio,
        weight_norm, update_norm, lr_now), read from the device in one copy; with no ``every``
        the epoch's last step. None when nothing was recorded."""
        if self.every is None and self.latest is not None:
            self.pending.append(self._gather(*self.latest))
            self.latest = None
        if not self.pending or self.layers is None:
            return None
        values = torch.stack([v for _, _, v in self.pending]).double().cpu().tolist()
        columns: dict[str, list] = {k: [] for k in (
            "step", "layer", "layer_index", "numel", "trust_ratio", "weight_norm",
            "update_norm", "lr_now")}
        for (step, lr, _), (ratios, weights, updates) in zip(self.pending, values):
            for i, (name, numel) in enumerate(self.layers):
                for key, value in (("step", step), ("layer", name), ("layer_index", i),
                                   ("numel", numel), ("trust_ratio", ratios[i]),
                                   ("weight_norm", _number(weights[i])),
                                   ("update_norm", _number(updates[i])),
                                   ("lr_now", lr)):
                    columns[key].append(value)
        self.pending = []
        return columns


def _number(value: float) -> float | None:
    """NaN (a norm the optimizer did not report) becomes null in the store."""
    return None if math.isnan(value) else value
