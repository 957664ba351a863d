"""A rough price of a grid in GPU-hours, for ``grid --dry-run``.

It is trial-epochs times training images per epoch, divided by an *assumed* training
throughput per GPU: public figures for an A100-class GPU in bf16 at 224x224, scaled by the
input's pixel count. Nothing here is measured; the printed line says so, with the figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .decode import survey
from .sources import DataError, find_layout

TRAIN_IMAGES = {"synthetic": 5000, "cifar10": 50_000, "cifar100": 50_000,
                "tinyimagenet": 100_000, "imagenet": 1_281_167}
INPUT_SIDE = {"synthetic": 32, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64, "imagenet": 224}
# Training images/s of one A100-class GPU at 224x224 in bf16, channels-last: rounded public
# figures (NVIDIA's DeepLearningExamples, timm's benchmark tables), not measured here.
IMAGES_PER_S_224 = {"cnn": 20_000, "resnet18": 5000, "resnet34": 3000, "resnet50": 2500,
                    "effb0": 2500}
MAX_SPEEDUP = 10  # small inputs stop paying off: launches and memory traffic dominate


def images_per_s(model: str, side: int, stem: str) -> float:
    """The assumed training throughput: the 224x224 figure times the pixel ratio, the input
    side counted at the resolution the network keeps after its stem."""
    effective = side * stem_scale(model, stem)
    return IMAGES_PER_S_224[model] * min(MAX_SPEEDUP, (224 / effective) ** 2)


def stem_scale(model: str, stem: str) -> int:
    """How much more resolution the cifar stem keeps: ResNets lose a stride-2 convolution
    and the max-pool (4x), EfficientNet-B0 a stride-2 convolution (2x); the small CNN has no
    stem to change."""
    if stem != "cifar":
        return 1
    return 4 if model.startswith("resnet") else 2 if model == "effb0" else 1


def _images_and_side(cfg: Any) -> tuple[int, int] | None:
    """(training images per epoch, input side) of a trial; None if unknown without the data."""
    if cfg.ds in TRAIN_IMAGES:
        n, side = TRAIN_IMAGES[cfg.ds], INPUT_SIDE[cfg.ds]
        if cfg.ds == "synthetic":
            n = cfg.train_subset or n
    else:
        try:
            layout = find_layout(cfg.ds, cfg.data_dir)
            sizes = survey(layout, per_split=8)
        except DataError:
            return None
        n = len(layout.train)
        side = 224 if len(sizes) > 1 else max(next(iter(sizes)))
    return min(n, cfg.train_subset or n), side


def cost_estimate(trials: Iterable[Any]) -> str:
    """Lines for ``--dry-run``: GPU-hours of training, labelled as an estimate with its
    assumptions."""
    seconds, unknown, rates = 0.0, 0, {}
    for cfg in trials:
        found = _images_and_side(cfg)
        if found is None:
            unknown += 1
            continue
        n, side = found
        rate = images_per_s(cfg.model, side, cfg.stem)
        stem = " (cifar stem)" if stem_scale(cfg.model, cfg.stem) > 1 else ""
        rates[f"{cfg.model} at {side}x{side}{stem}"] = rate
        passes = cfg.epochs + (2 * cfg.cl_epochs if cfg.mode == "bt" else 0)
        seconds += passes * n / rate
    assumed = "; ".join(f"{k} ~{v:,.0f}" for k, v in sorted(rates.items()))
    lines = [f"cost estimate: ~{_hours(seconds / 3600)} GPU-hours of training (an estimate, "
             f"not a measurement)",
             "  = trial-epochs x training images per epoch / assumed training images/s per GPU",
             f"  assumed images/s: {assumed or 'none'}",
             "  (an A100-class GPU in bf16: public figures at 224x224, scaled by input pixels, "
             f"at most {MAX_SPEEDUP}x;",
             "  Barlow Twins pre-training counts twice; evaluation and loading stalls left out)"]
    if unknown:
        lines.append(f"  {unknown} trial(s) left out: their image folder could not be read")
    return "\n".join(lines)


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"
