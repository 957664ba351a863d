"""The base class of LARS, TVLARS and LAMB: one ``step()`` for all three.

A subclass says which zero-initialised state tensors each parameter keeps
(``state_buffers``), how a group's hyper-parameters are checked (``_validate``) and how one
group is updated (``_update``, which calls the optimizer's functional form and returns its
trust ratios). The base class gathers each group's tensors, creates the state, calls the
update, and keeps the per-tensor trust ratios of the last step on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._kernels import Workspace


class RatioChunk(NamedTuple):
    """Trust ratios of some updated tensors, as a functional update returns them, with the
    norms they were computed from."""

    positions: list[int]  # indices into the list of updated parameters
    ratios: Tensor  # (n,): one per position
    norms: Tensor  # (2, n): ||w|| in row 0, the update direction's norm in row 1


def check_grad(grad: Tensor, owner: str) -> None:
    if grad.is_sparse:
        raise RuntimeError(f"{owner} does not support sparse gradients; use dense gradients")


def new_step(param: Tensor) -> Tensor:
    """A fresh step counter, on the parameter's device, exact for any realistic run."""
    return torch.zeros((), dtype=torch.int64, device=param.device)


class RatioCollector:
    """Gathers per-tensor trust ratios and norms from every group and bucket, then orders
    them once.

    The common case (one group, one device/dtype, one run) keeps the tensors as they are;
    runs already in order are concatenated; otherwise the pieces are put back in parameter
    order and stacked.
    """

    def __init__(self) -> None:
        self._chunks: list[RatioChunk] = []

    def add(self, chunk: RatioChunk) -> None:
        if chunk.positions:
            self._chunks.append(chunk)

    def result(self) -> tuple[Tensor | None, Tensor | None]:
        """``(ratios, norms)``: shapes (n,) and (2, n), in parameter order."""
        if not self._chunks:
            return None, None
        if len(self._chunks) == 1:
            return self._chunks[0].ratios, self._chunks[0].norms
        device, dtype = self._chunks[0].ratios.device, self._chunks[0].ratios.dtype
        flat = [i for chunk in self._chunks for i in chunk.positions]
        same_place = all(c.ratios.device == device and c.ratios.dtype == dtype
                         for c in self._chunks)
        if same_place and all(a < b for a, b in zip(flat, flat[1:])):
            return (torch.cat([c.ratios for c in self._chunks]),
                    torch.cat([c.norms for c in self._chunks], dim=1))
        pieces: list[tuple[int, Tensor, Tensor]] = []
        for chunk in self._chunks:
            ratios = chunk.ratios.to(device=device, dtype=dtype)
            norms = chunk.norms.to(device=device, dtype=dtype)
            pieces.extend(zip(chunk.positions, ratios.unbind(0), norms.unbind(1)))
        pieces.sort(key=lambda item: item[0])
        return (torch.stack([r for _, r, _ in pieces]),
                torch.stack([n for _, _, n in pieces], dim=1))


class LayerwiseOptimizer(torch.optim.Optimizer):
    """What LARS, TVLARS and LAMB share: the step loop, each group's hyper-parameters
    validated, the last step's per-tensor trust ratios and norms kept on the device, a reused
    scratch buffer, and step counters that follow their parameters.

    After a step, ``last_trust_ratios`` (n,) holds the ratio of each adapted tensor (in
    parameter order over all groups) and ``last_norms`` (2, n) the norms it was computed
    from, before any clip: ``||w||`` in row 0 and the update direction's norm in row 1
    (``||d||`` for LARS and TVLARS, ``||u||`` for LAMB). Both stay on the device; reading
    them is the caller's (one) host sync.

    Subclasses set ``state_buffers`` and implement ``_validate`` and ``_update``;
    ``_observe`` may record more of the step.
    """

    #: per-parameter state tensors, zeros shaped as the parameter, made on its first step
    state_buffers: tuple[str, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._validate(defaults)
        super().__init__(params, defaults)
        self.last_trust_ratios: Tensor | None = None
        self.last_norms: Tensor | None = None
        self._workspace = Workspace()

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad hyper-parameter of ``group``."""
        raise NotImplementedError

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[Tensor],
    ) -> list[RatioChunk]:
        """Update ``params`` in place (``buffers``: one list per ``state_buffers`` entry,
        ``steps``: the step counters, not yet incremented); return the trust ratios and
        the norms they came from."""
        raise NotImplementedError

    def _observe(self, group: dict[str, Any], param: Tensor, step: Tensor) -> None:
        """Record extra per-step values; ``param``/``step``: the first updated parameter."""

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[Tensor], list[int]]:
        """The group's tensors that have a gradient, their state (made on first use), and
        their positions in the group."""
        params, grads, steps, positions = [], [], [], []
        buffers: list[list[Tensor]] = [[] for _ in self.state_buffers]
        owner = type(self).__name__
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            check_grad(p.grad, owner)
            state = self.state[p]
            if not state:
                state["step"] = new_step(p)
                for key in self.state_buffers:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            for kept, key in zip(buffers, self.state_buffers):
                kept.append(state[key])
            steps.append(state["step"])
            positions.append(i)
        return params, grads, buffers, steps, positions

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        collector = RatioCollector()
        observed = False
        base = 0  # position of the group's first tensor among all groups' tensors
        for group in self.param_groups:
            params, grads, buffers, steps, positions = self._init_group(group)
            if params:
                for chunk in self._update(group, params, grads, buffers, steps):
                    collector.add(
                        chunk._replace(positions=[base + positions[k] for k in chunk.positions])
                    )
                if not observed:
                    self._observe(group, params[0], steps[0])
                    observed = True
            base += len(group["params"])
        self.last_trust_ratios, self.last_norms = collector.result()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but a group's own hyper-parameters are validated too."""
        self._validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, then the step counters are moved next to their parameters:
        ``load_state_dict`` casts every state tensor to its parameter's device except 'step'."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != param.device:
                state["step"] = step.to(param.device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_trust_ratios", None)
        self.__dict__.setdefault("last_norms", None)
        self.__dict__.setdefault("_workspace", Workspace())
        for group in self.param_groups:
            group.setdefault("foreach", None)
