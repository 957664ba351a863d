"""The paper's networks (untrained torchvision models) and a small CNN for quick runs.

``stem="imagenet"`` keeps torchvision's 7x7/2 convolution and max-pool, as the reference code
does even on 32x32 images; ``stem="cifar"`` swaps in a 3x3/1 convolution without max-pool,
the usual choice for small inputs.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("cnn", "resnet18", "resnet34", "resnet50", "effb0")


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: trains in seconds, for demos and tests."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(name: str, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """An untrained classifier with its head sized for ``num_classes``."""
    if name == "cnn":
        return SmallCNN(num_classes)
    import torchvision.models as tvm  # seconds to import: only the models that need it pay

    if name.startswith("resnet"):
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    if name == "effb0":
        model = tvm.efficientnet_b0(weights=None, num_classes=num_classes)
        if stem == "cifar":
            conv = model.features[0][0]
            model.features[0][0] = nn.Conv2d(3, conv.out_channels, 3, stride=1, padding=1,
                                             bias=False)
        return model
    raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")


def split_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the classifier by an identity: the backbone and its feature size."""
    if isinstance(model, SmallCNN) or hasattr(model, "fc"):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    if hasattr(model, "classifier"):  # EfficientNet: Dropout then Linear
        dim = model.classifier[-1].in_features
        model.classifier = nn.Identity()
        return model, dim
    raise ValueError(f"do not know where the head of {type(model).__name__} is")
