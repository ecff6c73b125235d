"""Datasets and loaders. Fashion-MNIST is read from local idx files; nothing is ever downloaded."""
from __future__ import annotations

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    fashion_mnist_loaders,
    load_fashion_mnist,
    stratified_subset,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "fashion_mnist_loaders",
    "load_fashion_mnist",
    "stratified_subset",
]
