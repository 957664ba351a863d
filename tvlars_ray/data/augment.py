"""Augmentations: the reference pipeline as one batched gather on the device, and the
per-sample torchvision pipelines of ``loader="torch"``."""

from __future__ import annotations

import math

import torch


class BatchAugment:
    """The reference augmentation for a whole uint8 batch at once, then normalisation.

    RandomCrop(size, padding=4) -> RandomHorizontalFlip -> RandomRotation(15), as one
    nearest-neighbour resampling with zero fill, the composition torchvision applies image
    by image: for every output pixel, the source pixel is found by undoing the rotation, the
    flip and the crop; pixels that land outside the image (padding, rotated-in corners) are
    zero. The gather runs on the uint8 images; one fused multiply-add then normalises.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4,
                 degrees: float = 15.0, train: bool = True) -> None:
        std_t = torch.tensor(std, dtype=torch.float32) * 255
        self.scale = (1 / std_t).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) * 255 / std_t).view(1, -1, 1, 1)
        self.padding, self.degrees, self.train = padding, degrees, train

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.train:
            images = self.resample(images, generator)
        if self.scale.device != images.device:  # once: no copy per batch
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images.float(), self.scale)

    def resample(self, images: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """The augmented uint8 batch.

        Undoing the rotation about the centre is linear in the output pixel (y, x), the flip
        negates x about the centre (a sign on the rotation's x row) and the crop adds an
        integer offset, so each source coordinate is a per-image (h, 1) column plus a
        per-image (1, w) row, rounded: few passes over the full grid.
        """
        n, c, h, w = images.shape
        dev = images.device
        p = self.padding
        # crop offsets in [-p, p]: the crop's pixel (r, c) is the source's (r + oy, c + ox)
        oy = torch.randint(-p, p + 1, (n, 1, 1), generator=g, device=dev).float()
        ox = torch.randint(-p, p + 1, (n, 1, 1), generator=g, device=dev).float()
        sign = 1 - 2 * (torch.rand(n, 1, 1, generator=g, device=dev) < 0.5).float()
        angle = (torch.rand(n, 1, 1, generator=g, device=dev) * 2 - 1) * math.radians(
            self.degrees)
        cos, sin = angle.cos(), angle.sin()
        cy, cx = (h - 1) / 2, (w - 1) / 2
        ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) - cy
        xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) - cx
        # source row and column of every output pixel (rotation, flip, crop undone)
        sy = (cos * ys + (cy + oy)) + (-sin * xs)
        sx = (sign * sin * ys + (cx + ox)) + (sign * cos * xs)
        sy, sx = sy.round_(), sx.round_()
        # inside the rotated frame (else zero) and inside the image (else padding, zero)
        valid = ((sy >= oy.clamp(min=0)) & (sy <= (h - 1) + oy.clamp(max=0))
                 & (sx >= ox.clamp(min=0)) & (sx <= (w - 1) + ox.clamp(max=0)))
        index = torch.where(valid, sx.add_(sy, alpha=w), float(h * w)).long().view(n, 1, h * w)
        # outside pixels read a zero appended after each image
        flat = torch.cat([images.reshape(n, c, h * w), images.new_zeros(n, c, 1)], dim=2)
        return flat.gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def torch_transform(mean: tuple[float, ...], std: tuple[float, ...],
                    size: int | tuple[int, int], train: bool):
    """The per-sample torchvision pipeline of the reference code, for images of one ``size``
    ((height, width), or an int for squares). An image of another size in a streamed folder
    is padded or cropped to it rather than breaking the batch."""
    from torchvision.transforms import v2  # heavy: only the torch loader needs it

    steps = [v2.ToImage()]
    if train:
        steps += [v2.RandomCrop(size, padding=4, pad_if_needed=True), v2.RandomHorizontalFlip(),
                  v2.RandomRotation(15)]
    else:
        steps.append(v2.CenterCrop(size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


IMAGENET_CROP, IMAGENET_RESIZE = 224, 256


def imagenet_transform(mean: tuple[float, ...], std: tuple[float, ...], train: bool):
    """The standard ImageNet pipeline (the LARS and LAMB papers' setting), for images of any
    size: RandomResizedCrop(224) and a horizontal flip to train, Resize(256) and
    CenterCrop(224) to test."""
    from torchvision.transforms import v2  # heavy: only the torch loader needs it

    steps = [v2.ToImage()]
    if train:
        steps += [v2.RandomResizedCrop(IMAGENET_CROP, antialias=True),
                  v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(IMAGENET_RESIZE, antialias=True), v2.CenterCrop(IMAGENET_CROP)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
