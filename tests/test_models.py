import pytest
import torch

from tvlars_ray.models import MODELS, build_model, split_head

SHAPES = {"synthetic/cifar10": (32, 10), "cifar100": (32, 100), "tinyimagenet": (64, 200)}


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", sorted(SHAPES))
def test_every_model_runs_forward_and_backward(name, stem, data):
    size, classes = SHAPES[data]
    torch.manual_seed(0)
    model = build_model(name, classes, stem)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cifar_stem_keeps_resolution():
    imagenet = build_model("resnet18", 10, "imagenet")
    cifar = build_model("resnet18", 10, "cifar")
    x = torch.randn(1, 3, 32, 32)
    first = lambda m: m.maxpool(m.relu(m.bn1(m.conv1(x))))  # noqa: E731
    assert first(imagenet).shape[-1] == 8 and first(cifar).shape[-1] == 32
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048), ("effb0", 1280),
                                       ("cnn", 128)])
def test_split_head_reports_the_feature_size(name, dim):
    backbone, features = split_head(build_model(name, 10, "cifar"))
    assert features == dim
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, dim)
