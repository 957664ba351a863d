"""The generated ``synthetic`` dataset: CIFAR-shaped, offline, learnable by a small CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SYNTHETIC_SIZES = {"train": 5000, "test": 1000}


def synthetic_arrays(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped (3x32x32, 10 classes) images that a small CNN learns and a linear model not.

    Each class owns four smooth random templates; a sample is one of them, blended with a
    template of another class, shifted by up to 6 pixels, maybe flipped, contrast-jittered
    and buried in pixel noise. The templates depend on ``seed`` only, so train and test
    share them; the samples depend on ``seed`` and ``split``.
    """
    classes, per_class, size = 10, 4, 32
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes * per_class, 3, 4, 4, generator=g)
    fine = torch.randn(classes * per_class, 3, 8, 8, generator=g)
    templates = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    templates += 0.5 * F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    templates /= templates.flatten(1).std(1).view(-1, 1, 1, 1)
    templates = templates.view(classes, per_class, 3, size, size)

    gs = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 1, "test": 2}[split])
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gs)]
    x = templates[labels, torch.randint(0, per_class, (n,), generator=gs)]
    other = (labels + torch.randint(1, classes, (n,), generator=gs)) % classes
    blend = torch.rand(n, 1, 1, 1, generator=gs) * 0.7
    x = x + blend * templates[other, torch.randint(0, per_class, (n,), generator=gs)]
    shift = torch.randint(-6, 7, (2, n), generator=gs)
    ar = torch.arange(size)
    rows = (ar[None, :] + shift[0][:, None]) % size
    cols = (ar[None, :] + shift[1][:, None]) % size
    x = x[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=gs) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs))
    x = x + 0.3 * torch.randn(n, 3, 1, 1, generator=gs)
    x = x + 1.0 * torch.randn(x.shape, generator=gs)
    images = ((x * 0.22 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels
