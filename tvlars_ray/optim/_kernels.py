"""The kernels the LARS-family updates are built from: per-tensor norms and trust ratios,
the split of a parameter list by device, dtype and adaptation, and the CPU cache blocking
(runs of tensors sized for the cache, and a reused workspace for their temporaries).

Everything here runs on the parameters' device and never reads a tensor value on the host,
so ``step()`` stays free of host-device synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Half-precision norms overflow and round badly: accumulate and compare them in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    return norm_dtype(dtype) or dtype


def pair_norms(w: Tensor, d: Tensor) -> Tensor:
    """``[||w||, ||d||]`` as a (2, 1) tensor, the single-tensor form of ``foreach_norms``."""
    dtype = norm_dtype(w.dtype)
    return torch.stack([torch.linalg.vector_norm(w, dtype=dtype),
                        torch.linalg.vector_norm(d, dtype=dtype)]).view(2, 1)


def foreach_norms(ws: list[Tensor], ds: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms as a (2, n) tensor (``||w_i||`` in row 0, ``||d_i||`` in row 1).

    Accelerators use one multi-tensor kernel. On the CPU, each norm is the square root of a
    dot product: torch's CPU norm kernels run at 2/3 of the speed of its BLAS dot (measured:
    4.2 against 2.8 ms over ResNet-18's 11.2M weights, 2 threads), and these two reductions
    are most of what LARS adds to SGD's memory traffic. Half precision keeps the float32
    norm kernels (its dot would accumulate in half).
    """
    if blocked(ws[0]) and norm_dtype(ws[0].dtype) is None:
        return torch.stack([_square_norm(x) for x in (*ws, *ds)]).sqrt_().view(2, len(ws))
    norms = torch._foreach_norm([*ws, *ds], 2, dtype=norm_dtype(ws[0].dtype))
    return torch.stack(norms).view(2, len(ws))


def _square_norm(x: Tensor) -> Tensor:
    """``||x||^2`` (a channels-last weight is not a flat vector: it takes the norm kernel)."""
    if x.is_contiguous():
        flat = x.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(x).square()


def trust_ratio(
    norms: Tensor, scale: float | Tensor, w_clip: float | None, d_clip: float | None
) -> Tensor:
    """``scale * min(||w||, w_clip) / min(||d||, d_clip)``, and 1 where either norm is 0.

    ``norms`` holds ``||w||`` in row 0 and ``||d||`` in row 1, one column per tensor.
    """
    if w_clip is not None and w_clip == d_clip:
        num, den = norms.clamp(max=w_clip)
    else:
        num = norms[0] if w_clip is None else norms[0].clamp(max=w_clip)
        den = norms[1] if d_clip is None else norms[1].clamp(max=d_clip)
    ratio = num.div(den)
    if not (isinstance(scale, float) and scale == 1.0):
        ratio.mul_(scale)
    return torch.where(norms.amin(0) > 0, ratio, 1.0)


def is_excluded(param: Tensor, exclude_1d: bool) -> bool:
    """Biases and norm-layer weights (``ndim <= 1``) are left out of adaptation on request."""
    return exclude_1d and param.ndim <= 1


def split_adapted(params: Sequence[Tensor], exclude_1d: bool) -> tuple[list[int], list[int]]:
    """Positions of the adapted and of the excluded tensors in ``params``."""
    adapted: list[int] = []
    excluded: list[int] = []
    for k, p in enumerate(params):
        (excluded if is_excluded(p, exclude_1d) else adapted).append(k)
    return adapted, excluded


def group_by_device_and_dtype(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` split by (device, dtype): each bucket feeds one foreach call."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


# Device types whose multi-tensor paths walk a bucket in cache-sized runs of tensors, so each
# kernel finds its inputs still in cache from the previous one, and keep their temporaries
# in a reused Workspace. Accelerators run each bucket whole, with allocated temporaries.
BLOCKED_DEVICE_TYPES = ("cpu",)
CPU_CHUNK_NUMEL = 1 << 19


def blocked(tensor: Tensor) -> bool:
    return tensor.device.type in BLOCKED_DEVICE_TYPES


def chunks(params: Sequence[Tensor]) -> list[range]:
    """Consecutive runs of ``params`` with at most ``CPU_CHUNK_NUMEL`` elements on blocked
    devices (a larger tensor forms a run of its own); elsewhere one run of all of them."""
    if not params or not blocked(params[0]):
        return [range(len(params))]
    runs: list[range] = []
    start, size = 0, 0
    for k, p in enumerate(params):
        n = p.numel()
        if k > start and size + n > CPU_CHUNK_NUMEL:
            runs.append(range(start, k))
            start, size = k, 0
        size += n
    runs.append(range(start, len(params)))
    return runs


class Workspace:
    """Scratch memory for the per-step temporaries of the CPU paths, kept between steps.

    A fresh temporary of a layer's size is fresh memory that the OS maps and zeroes on every
    step, which costs more than the arithmetic done in it. One flat buffer per (device,
    dtype), as large as the largest run of tensors (see ``chunks``), is reused instead.
    Accelerators do not need it: their caching allocators already recycle memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Uninitialised contiguous tensors shaped as ``tensors``, valid until the next call."""
        ref = tensors[0]
        total = sum(t.numel() for t in tensors)
        key = (ref.device, ref.dtype)
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < total:
            flat = self._buffers[key] = torch.empty(total, dtype=ref.dtype, device=ref.device)
        out, offset = [], 0
        for t in tensors:
            n = t.numel()
            out.append(flat[offset : offset + n].view(t.shape))
            offset += n
        return out


def add_scaled(
    a: list[Tensor], b: list[Tensor], alpha: float, workspace: Workspace
) -> list[Tensor]:
    """``a + alpha * b`` as new tensors.

    On CPU each result is written straight into the workspace: the multi-tensor ops have no
    ``out=`` form, and copy-then-add would cost a second pass over the data. Elsewhere one
    multi-tensor kernel allocates the results from the caching allocator.
    """
    if not blocked(a[0]):
        return list(torch._foreach_add(a, b, alpha=alpha))
    out = workspace.like(a)
    for o, x, y in zip(out, a, b):
        torch.add(x, y, alpha=alpha, out=o)
    return out


def pick(items: Sequence, indices: Iterable[int]) -> list:
    return [items[i] for i in indices]
