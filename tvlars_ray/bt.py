"""Barlow Twins (``mode="bt"``): self-supervised pre-training with the optimizer under study,
then a linear evaluation of the frozen backbone.

Stage 1 (``cl_epochs``): two augmented views per image, backbone without its head, a
projector (Linear-BN-ReLU, Linear-BN-ReLU, Linear) sized from the backbone, and the loss
``sum_i (1 - c_ii)^2 + btlmbda * sum_{i != j} c_ij^2`` on the cross-correlation of the
batch-normalised embeddings over the *global* batch (batch norms synchronised across the DDP
workers, ``c`` summed across them). Stage 2 (``epochs``): a linear classifier on the frozen
backbone, in eval mode, trained with SGD (momentum 0.9) at ``lr_classifier`` on a cosine
schedule; the backbone is fine-tuned only if ``lr_backbone > 0``.

Both stages write their epochs to the store (``stage`` pretrain / linear) and checkpoint; a
restarted trial continues in the stage and at the epoch where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .compat import all_reduce_with_grad
from .config import TrialConfig
from .data import BatchAugment, DeviceLoader, dataset_stats, load_splits
from .models import build_model, split_head
from .optim import build_optimizer
from .schedules import build_schedule
from .worker import (
    Recorder,
    Stage,
    Worker,
    evaluate,
    load_checkpoint,
    optimise,
    prepare_model,
    run_stage,
    seed_everything,
    train_epoch,
    unwrap,
)


# -- the loss and the model ----------------------------------------------------------------
def barlow_twins_loss(c: torch.Tensor, btlmbda: float) -> torch.Tensor:
    """``sum_i (1 - c_ii)^2 + btlmbda * sum_{i != j} c_ij^2`` of a cross-correlation matrix."""
    diagonal = torch.diagonal(c)
    on = (1 - diagonal).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    return on + btlmbda * off


def projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """Linear-BN-ReLU for every width but the last, then a Linear without bias."""
    layers: list[nn.Module] = []
    sizes = [in_dim, *dims]
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Backbone + projector; ``forward(y1, y2)`` returns the loss over the global batch."""

    def __init__(self, backbone: nn.Module, feature_dim: int, dims: list[int], btlmbda: float,
                 global_batch: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = backbone, feature_dim
        self.projector = projector(feature_dim, dims)
        self.bn = nn.BatchNorm1d(dims[-1], affine=False)
        self.btlmbda, self.global_batch = btlmbda, global_batch

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.backbone(y1)), self.projector(self.backbone(y2))
        if z1.dtype not in (torch.float32, torch.float64):  # bf16 under autocast
            z1, z2 = z1.float(), z2.float()
        c = self.bn(z1).T @ self.bn(z2) / self.global_batch
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            c = all_reduce_with_grad(c)  # differentiable: each rank gets the global matrix
        return barlow_twins_loss(c, self.btlmbda)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all DDP ranks, on any device.

    torch's SyncBatchNorm only runs on GPUs; this sums the per-channel count and sum, then
    the centred sum of squares, with differentiable all-reduces, so the CPU (gloo) path
    computes the same statistics (and gradients) as one process holding the whole batch.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count = torch.tensor([x.numel() / channels], device=x.device, dtype=xf.dtype)
        totals = all_reduce_with_grad(torch.cat([xf.sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / n  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(
                    self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp(min=1))
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm on GPUs, GlobalBatchNorm elsewhere (same statistics)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            like = next(iter(child.state_dict().values()))
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats,
                                     device=like.device, dtype=like.dtype)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            synchronise_batchnorm(child, device)
    return model


class LinearEval(nn.Module):
    """A linear classifier on a backbone that stays frozen, in eval mode (BN statistics
    fixed), unless it is fine-tuned."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 finetune: bool) -> None:
        super().__init__()
        self.backbone, self.finetune = backbone, finetune
        self.head = nn.Linear(feature_dim, num_classes)
        backbone.requires_grad_(finetune)

    def train(self, mode: bool = True) -> LinearEval:
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.finetune:
            return self.head(self.backbone(x))
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features.float())


# -- the two views ---------------------------------------------------------------------------
class TwoViews:
    """Barlow Twins' pair of augmentations of a uint8 batch, batched on the device.

    Each view: random resized crop (scale 0.2-1, to the dataset's size) and flip, colour jitter
    (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8, grayscale p 0.2,
    Gaussian blur (sigma 0.1-2) with p 1.0 / 0.1, solarisation with p 0.0 / 0.2; then
    normalisation.
    """

    train = True

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor, g: torch.Generator | None):
        x = images.float() / 255
        return self.view(x, g, blur=1.0, solarize=0.0), self.view(x, g, blur=0.1, solarize=0.2)

    def view(self, x: torch.Tensor, g, blur: float, solarize: float) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device

        def rand(*shape):
            return torch.rand(*shape, generator=g, device=dev)

        def coin(p):
            return (rand(n, 1, 1, 1) < p).float()

        x = resized_crop(x, rand(n), rand(n), rand(n, 2), coin(0.5).view(n))
        jitter = coin(0.8)
        x = jitter * color_jitter(x, rand(n, 4)) + (1 - jitter) * x
        gray = coin(0.2)
        x = gray * grayscale(x).expand_as(x) + (1 - gray) * x
        blurred = coin(blur)
        x = blurred * gaussian_blur(x, 0.1 + 1.9 * rand(n)) + (1 - blurred) * x
        sol = coin(solarize) * (x >= 0.5).float()
        x = sol * (1 - x) + (1 - sol) * x
        mean = _constant(self.mean, dev).view(1, -1, 1, 1)
        return (x - mean) / _constant(self.std, dev).view(1, -1, 1, 1)


def resized_crop(x: torch.Tensor, u_scale: torch.Tensor, u_ratio: torch.Tensor,
                 u_pos: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-image crops of area 0.2-1 and aspect 3/4-4/3, resized back, bilinear."""
    n = x.shape[0]
    scale = 0.2 + 0.8 * u_scale
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio)
    w = torch.sqrt(scale * ratio).clamp(max=1.0)
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * u_pos[:, 0] - 1)  # centre in [-1, 1] units, crop inside the image
    cy = (1 - h) * (2 * u_pos[:, 1] - 1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = w * (1 - 2 * flip)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


_LUMA = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_FROM_YIQ = tuple(map(tuple, torch.linalg.inv(torch.tensor(_TO_YIQ, dtype=torch.float64)).tolist()))
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant on the device, copied there once (not once per batch)."""
    key = (values, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _constant(_LUMA, x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each by a per-image random factor."""
    n = x.shape[0]
    b = (0.6 + 0.8 * u[:, 0]).view(n, 1, 1, 1)
    c = (0.6 + 0.8 * u[:, 1]).view(n, 1, 1, 1)
    s = (0.8 + 0.4 * u[:, 2]).view(n, 1, 1, 1)
    hue = (u[:, 3] - 0.5) * 0.2 * 2 * math.pi  # +-0.1 of a turn
    x = (x * b).clamp(0, 1)
    mean = grayscale(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = grayscale(x)
    x = ((x - gray) * s + gray).clamp(0, 1)
    # hue: rotate the chroma plane of YIQ
    to_yiq = _constant(_TO_YIQ, x.device)
    cos, sin = hue.cos(), hue.sin()
    rot = torch.zeros(n, 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = _constant(_FROM_YIQ, x.device) @ rot @ to_yiq
    flat = x.flatten(2)
    return (matrix @ flat).view_as(x).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (kernel about a tenth of the image)."""
    n, c, h, w = x.shape
    size = max(3, (h // 10) | 1)
    half = size // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"),
                    kernel.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"),
                    kernel.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, h, w)


# -- the stages ------------------------------------------------------------------------------
def run(cfg: TrialConfig, job: dict[str, Any]) -> None:
    """Both stages on this worker, continuing in the stage and at the epoch of the trial's
    checkpoint if it has one."""
    worker = Worker.current(cfg)
    recorder = Recorder(cfg, job, worker)
    seed_everything(cfg.seed)
    train, test, val = load_splits(cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset,
                                   cfg.test_subset, cfg.val_subset)
    mean, std = dataset_stats(cfg.ds, cfg.norm, train)
    recorder.mark("data_ready_at")
    state = load_checkpoint(worker.device)

    def fresh_backbone() -> tuple[nn.Module, int]:
        torch.manual_seed(cfg.seed)
        return split_head(build_model(cfg.model, train.num_classes, cfg.stem))

    backbone, feature_dim = fresh_backbone()
    if state is None or state["stage"] == "pretrain":
        trained = pretrain(cfg, worker, backbone, feature_dim, train, mean, std, recorder, state)
        if trained is None:
            return
        backbone, _ = fresh_backbone()  # plain batch norms again, for evaluation
        backbone.load_state_dict(trained)
        state = None
    linear_evaluation(cfg, worker, backbone, feature_dim, train, test, val, mean, std,
                      recorder, state)


def pretrain_epoch(model: nn.Module, loader, optimizer, schedule, worker: Worker) -> dict:
    """One pass of Barlow Twins pre-training over this rank's shard."""
    model.train()
    tally = worker.tally(1)
    lr = optimizer.param_groups[0]["lr"]
    for (y1, y2), _ in loader:
        lr = optimizer.param_groups[0]["lr"]
        with worker.autocast():
            loss = model(worker.inputs(y1), worker.inputs(y2))
        optimise(loss, optimizer, schedule)
        tally.add(len(y1), loss * len(y1))
    (loss_sum,), count = tally.total()
    return {"cl_loss": loss_sum / count, "lr_now": lr, "train_samples": int(count)}


def pretrain(cfg: TrialConfig, worker: Worker, backbone: nn.Module, feature_dim: int, train,
             mean, std, recorder: Recorder, state: dict | None) -> dict | None:
    """Stage 1: the trained backbone's weights, or None if the loss diverged.

    ``cl_epochs = 0`` skips it: the linear evaluation then measures a randomly initialised
    backbone, the baseline pre-training has to beat."""
    model = BarlowTwins(backbone, feature_dim, cfg.projector_dims, cfg.btlmbda, cfg.bs)
    if worker.world > 1:
        model = synchronise_batchnorm(model, worker.device)
    model = prepare_model(model, worker, cfg.compile)
    loader = DeviceLoader(train, cfg.bs // worker.world, TwoViews(mean, std), worker.device,
                          worker.rank, worker.world, cfg.seed)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, max(cfg.cl_epochs, 1), len(loader), cfg.bs,
                              cfg.warmup_epochs, phi=cfg.phi_args)
    stage = Stage("pretrain", model, optimizer, schedule, loader, cfg.cl_epochs,
                  one_epoch=lambda batches: pretrain_epoch(model, batches, optimizer, schedule,
                                                           worker),
                  loss="cl_loss")
    if not run_stage(stage, worker, cfg, recorder, state):
        return None
    return unwrap(model).backbone.state_dict()


def linear_evaluation(cfg: TrialConfig, worker: Worker, backbone: nn.Module, feature_dim: int,
                      train, test, val, mean, std, recorder: Recorder,
                      state: dict | None) -> None:
    """Stage 2: the linear classifier on the (frozen) pre-trained backbone, tested on the test
    set and, with a hold-out (``val``, never seen in either stage), validated on it."""
    finetune = cfg.lr_backbone > 0
    model = prepare_model(LinearEval(backbone, feature_dim, train.num_classes, finetune),
                          worker, cfg.compile)
    per_worker = cfg.bs // worker.world
    loader = DeviceLoader(train, per_worker, BatchAugment(mean, std), worker.device, worker.rank,
                          worker.world, cfg.seed)
    test_loader, val_loader = (
        None if data is None else DeviceLoader(data, per_worker,
                                               BatchAugment(mean, std, train=False),
                                               worker.device, worker.rank, worker.world,
                                               shuffle=False)
        for data in (test, val))
    net = unwrap(model)
    groups = [{"params": list(net.head.parameters()), "lr": cfg.lr_classifier}]
    if finetune:
        groups.append({"params": list(net.backbone.parameters()), "lr": cfg.lr_backbone})
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.wd)
    schedule = build_schedule(optimizer, "cosine", cfg.epochs, len(loader), cfg.bs, 0)
    stage = Stage("linear", model, optimizer, schedule, loader, cfg.epochs,
                  one_epoch=lambda batches: train_epoch(model, batches, optimizer, schedule,
                                                        worker),
                  evaluate=lambda: {**evaluate(model, test_loader, worker, topk5=True), **(
                      {} if val_loader is None
                      else evaluate(model, val_loader, worker, topk5=False, split="val"))},
                  seed_offset=10_000)
    run_stage(stage, worker, cfg, recorder, state)
