"""Data sets for daso: MNIST from IDX files and ImageFolder-layout images (CIFAR-10).

Nothing here downloads: MNIST's test split ships inside the package
(:data:`EMBEDDED_MNIST_DIR`), and other data is read from paths the user gives.
"""

from __future__ import annotations

from daso.data.imagefolder import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageFolderDataset,
    cifar10_datasets,
    resolve_imagefolder_root,
)
from daso.data.mnist import (
    EMBEDDED_MNIST_DIR,
    MNIST_MEAN,
    MNIST_STD,
    find_mnist_files,
    mnist_datasets,
    read_idx,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "EMBEDDED_MNIST_DIR",
    "ImageFolderDataset",
    "MNIST_MEAN",
    "MNIST_STD",
    "cifar10_datasets",
    "find_mnist_files",
    "mnist_datasets",
    "read_idx",
    "resolve_imagefolder_root",
]
