"""Datasets and loaders. Fashion-MNIST is read from local idx files; nothing is ever downloaded.

The FFCV parts (writers, validator, loader; ``import ffcv`` takes ~10 s) load on first use.
"""
from __future__ import annotations

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    fashion_mnist_loaders,
    load_fashion_mnist,
    stratified_subset,
)

_LAZY = {
    "write_image_folder": "ffcv_io", "write_dataset": "ffcv_io", "write_arrays": "ffcv_io",
    "write_fashion_mnist": "ffcv_io", "validate_beton": "ffcv_io", "BetonInfo": "ffcv_io",
    "ffcv_loader": "ffcv_loader", "torch_loader": "ffcv_loader", "resolve_loader": "loaders",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "fashion_mnist_loaders",
    "load_fashion_mnist",
    "stratified_subset",
]
