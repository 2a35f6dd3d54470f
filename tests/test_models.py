"""Tests of daso.models: the MNIST CNN, the CIFAR ResNets and build_model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from daso.errors import ConfigError
from daso.models import MODEL_NAMES, CifarResNet, MnistCNN, build_model, resnet20, resnet_cifar
from daso.models.resnet import _ZeroPadShortcut


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mnist_cnn_maps_batch_to_logits_and_backpropagates():
    torch.manual_seed(0)
    model = MnistCNN()
    x = torch.randn(4, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mnist_cnn_has_batchnorm_and_about_80k_parameters():
    model = MnistCNN()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_params(model) == 80_218
    assert 50_000 <= n_params(model) <= 150_000


def test_mnist_cnn_num_classes_sets_output_width():
    assert MnistCNN(num_classes=3)(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_resnet20_option_a_has_the_papers_0_27m_parameters():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters. Option A shortcuts have none,
    # which gives 269,722; the often-quoted 272,474 counts option-B projection shortcuts.
    model = resnet20()
    assert n_params(model) == 269_722
    assert round(n_params(model) / 1e6, 2) == 0.27
    assert n_params(resnet20(shortcut="B")) == 272_474


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018)],
)
def test_resnet_family_parameter_counts(name, expected):
    assert n_params(build_model(name)) == expected


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_resnet_maps_cifar_batch_to_logits(name):
    model = build_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and out.dtype == torch.float32


def test_resnet_depth_counts_weighted_layers():
    model = resnet_cifar(32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.depth == 32 == len(convs) + len(linears)


@pytest.mark.parametrize(("width", "channels"), [(0.5, 32), (1, 64), (2, 128)])
def test_resnet_width_multiplier_scales_stages(width, channels):
    model = resnet20(width=width)
    assert model.fc.in_features == channels
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_backward_reaches_every_parameter():
    model = resnet20()
    logits = model(torch.randn(3, 3, 32, 32))
    nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    shortcut = _ZeroPadShortcut(in_channels=2, out_channels=4, stride=2)
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    y = shortcut(x)
    assert y.shape == (2, 4, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 2:], torch.zeros(2, 2, 2, 2))
    assert n_params(shortcut) == 0


def test_resnet_convs_use_kaiming_fan_out_init():
    torch.manual_seed(0)
    conv = resnet20().stage3[1].conv1  # 64 -> 64, 3x3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)


@pytest.mark.parametrize("depth", [21, 2, 0, -4, 20.0, "20", True])
def test_resnet_cifar_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(ConfigError, match="6n\\+2"):
        resnet_cifar(depth)


def test_resnet_cifar_accepts_depth_110():
    assert isinstance(resnet_cifar(110), CifarResNet)


def test_resnet_rejects_unknown_shortcut_and_bad_width():
    with pytest.raises(ConfigError, match="shortcut"):
        resnet20(shortcut="C")
    with pytest.raises(ConfigError, match="width"):
        resnet20(width=0)


def test_build_model_builds_every_listed_name():
    assert MODEL_NAMES == (
        "mnist_cnn",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "char_transformer",
    )
    for name in MODEL_NAMES:
        assert isinstance(build_model(name, num_classes=10), nn.Module)
    assert isinstance(build_model("mnist_cnn"), MnistCNN)


def test_build_model_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*mnist_cnn, resnet20"):
        build_model("resnet18")


def test_build_model_passes_keyword_arguments():
    assert build_model("resnet20", width=2).fc.in_features == 128
    with pytest.raises(TypeError):
        build_model("mnist_cnn", width=2)
