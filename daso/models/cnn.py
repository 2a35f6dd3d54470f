"""A small convolutional network for MNIST.

A LeNet-style CNN (after LeCun et al. 1998, "Gradient-based learning applied to
document recognition") with one BatchNorm layer (Ioffe & Szegedy 2015), so that
distributed runs exercise the synchronisation of BatchNorm running statistics.
It has 80,218 parameters for 10 classes and trains to about 98% validation accuracy
on 8,000 MNIST images in three epochs of SGD on one CPU thread.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistCNN"]


class MnistCNN(nn.Module):
    """CNN for ``[B, 1, 28, 28]`` images.

    Layers: conv 5x5 (1 -> 16, no bias) - BatchNorm2d(16) - ReLU - maxpool 2
    -> conv 5x5 (16 -> 32) - ReLU - maxpool 2 -> flatten (32 x 4 x 4 = 512)
    -> linear 512 -> 128 - ReLU -> linear 128 -> ``num_classes``.

    Args:
        num_classes: number of output logits.

    Example::

        >>> model = MnistCNN()
        >>> model(torch.zeros(8, 1, 28, 28)).shape
        torch.Size([8, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, bias=False),  # [B, 16, 24, 24]
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [B, 16, 12, 12]
            nn.Conv2d(16, 32, kernel_size=5),  # [B, 32, 8, 8]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [B, 32, 4, 4]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # [B, 512]
            nn.Linear(32 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits float32 ``[B, num_classes]`` for images float32 ``[B, 1, 28, 28]``."""
        return self.classifier(self.features(x))
