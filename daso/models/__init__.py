"""Models trained by daso, built by name with :func:`build_model`.

- ``mnist_cnn``: :class:`~daso.models.cnn.MnistCNN`, a small CNN with BatchNorm for MNIST.
- ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``: the CIFAR ResNets of
  He et al. 2016 (:mod:`daso.models.resnet`); keyword arguments ``width`` and ``shortcut``.
- ``char_transformer``: :class:`~daso.models.charlm.CharTransformer`, a decoder-only
  character language model (``num_classes`` is the vocabulary size; keyword ``context``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from daso.errors import ConfigError
from daso.models.charlm import CharTransformer
from daso.models.cnn import MnistCNN
from daso.models.resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet_cifar

__all__ = [
    "MODEL_NAMES",
    "CharTransformer",
    "CifarResNet",
    "MnistCNN",
    "build_model",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    # a language model's "classes" are its vocabulary
    "char_transformer": lambda num_classes=65, **kw: CharTransformer(vocab_size=num_classes, **kw),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_model`."""


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model called ``name`` with ``num_classes`` outputs.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of output logits.
        **kwargs: passed to the model's constructor (``width``, ``shortcut`` for ResNets).

    Returns:
        A freshly initialised model on the CPU, in training mode.

    Raises:
        ConfigError: (a ``ValueError``) ``name`` is unknown; the message lists the known names.
        TypeError: a keyword argument the model does not take.

    Example::

        >>> build_model("resnet20").fc.out_features
        10
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        ) from None
    return builder(num_classes=num_classes, **kwargs)
