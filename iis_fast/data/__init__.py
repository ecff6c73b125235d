"""Datasets and loaders. Fashion-MNIST is read from local idx files; nothing is ever downloaded.

Modules: ``fashion_mnist`` (the dataset), ``sampling`` (stratified index rules), ``beton`` (the FFCV file format
and its validator), ``ffcv_writer`` (writing ``.beton`` files), ``ffcv_loader`` (FFCV batches), ``torch_loader``
(DataLoader batches, no FFCV/numba), ``loaders`` (whatever the user passes -> batches). The FFCV parts
(``import ffcv`` takes ~10 s) and the loaders load on first use.
"""
from __future__ import annotations

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    fashion_mnist_loaders,
    load_fashion_mnist,
)
from .sampling import stratified_subset

_LAZY = {
    "write_image_folder": "ffcv_writer", "write_dataset": "ffcv_writer", "write_arrays": "ffcv_writer",
    "write_fashion_mnist": "ffcv_writer", "validate_beton": "beton", "BetonInfo": "beton",
    "ffcv_loader": "ffcv_loader", "torch_loader": "torch_loader", "resolve_loader": "loaders",
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
