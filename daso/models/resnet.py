"""ResNets for CIFAR-10 (He et al. 2016, "Deep Residual Learning for Image Recognition").

The network of section 4.2: a 3x3 convolution with 16 filters, then three stages
of ``n`` basic blocks (two 3x3 convolutions each) on 32x32, 16x16 and 8x8 feature
maps with 16, 32 and 64 filters, then global average pooling and a linear layer:
``6n + 2`` weighted layers. Stages 2 and 3 halve the feature map with a stride-2
convolution in their first block. Shortcuts are identities; where the shape
changes they are option A of the paper (sub-sample by 2 and append zero channels,
no parameters). Option B (1x1 projection + BatchNorm) is available for comparison.

Parameter counts for 10 classes, width 1, option A: ResNet-20 269,722 (the paper's
"0.27M"), ResNet-32 464,154, ResNet-44 658,586, ResNet-56 853,018. With option B
ResNet-20 has 272,474.

Convolutions use the initialisation of He et al. 2015 ("Delving Deep into
Rectifiers"), ``kaiming_normal_`` with fan-out and ReLU gain; BatchNorm starts at
scale 1 and shift 0; the final linear layer keeps PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daso.errors import ConfigError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
]

_SHORTCUTS = ("A", "B")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> ``[B, C_out, H / stride, W / stride]``."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + s(x))``.

    Args:
        in_channels: channels of the input ``[B, in_channels, H, W]``.
        out_channels: channels of the output.
        stride: stride of the first convolution (2 halves ``H`` and ``W``).
        shortcut: ``"A"`` zero-padded identity or ``"B"`` 1x1 projection + BatchNorm,
            used only when the shape changes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> ``[B, C_out, H / stride, W / stride]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016, section 4.2, with ``6 * blocks_per_stage + 2`` layers.

    Args:
        blocks_per_stage: ``n``, basic blocks in each of the three stages.
        num_classes: number of output logits.
        width: multiplier of the stage widths 16/32/64 (e.g. 0.5 or 2; each width is
            rounded and at least 1).
        shortcut: ``"A"`` (paper's CIFAR choice, parameter-free) or ``"B"`` (projection).

    Example::

        >>> model = CifarResNet(3)  # ResNet-20
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        width: float = 1,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if shortcut not in _SHORTCUTS:
            raise ConfigError(f"shortcut={shortcut!r} is unknown; pass one of {_SHORTCUTS}")
        if not width > 0:
            raise ConfigError(f"width={width!r} must be positive (1 gives widths 16/32/64)")
        widths = [max(1, round(base * width)) for base in (16, 32, 64)]
        self.depth = 6 * blocks_per_stage + 2
        self.stem = nn.Sequential(
            _conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        in_channels = widths[0]
        for index, out_channels in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, shortcut))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits float32 ``[B, num_classes]`` for images float32 ``[B, 3, H, W]`` (32x32)."""
        x = self.stem(x)  # [B, 16w, 32, 32]
        x = self.stage3(self.stage2(self.stage1(x)))  # [B, 64w, 8, 8]
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(
    depth: int, num_classes: int = 10, width: float = 1, shortcut: str = "A"
) -> CifarResNet:
    """A CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...).

    Raises:
        ConfigError: ``depth`` is not ``6n + 2`` with ``n >= 1``, or ``width``/``shortcut``
            are invalid.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"depth={depth!r} is not 6n+2 for an integer n >= 1; "
            "pass 20, 32, 44, 56, 110 or another 6n+2"
        )
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, width=width, shortcut=shortcut)


def resnet20(num_classes: int = 10, width: float = 1, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (n = 3): 269,722 parameters for 10 classes, width 1, option A."""
    return resnet_cifar(20, num_classes, width, shortcut)


def resnet32(num_classes: int = 10, width: float = 1, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (n = 5): 464,154 parameters for 10 classes, width 1, option A."""
    return resnet_cifar(32, num_classes, width, shortcut)


def resnet44(num_classes: int = 10, width: float = 1, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (n = 7): 658,586 parameters for 10 classes, width 1, option A."""
    return resnet_cifar(44, num_classes, width, shortcut)


def resnet56(num_classes: int = 10, width: float = 1, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (n = 9): 853,018 parameters for 10 classes, width 1, option A."""
    return resnet_cifar(56, num_classes, width, shortcut)
