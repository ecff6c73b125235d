"""Data specs: what ``score``, ``sweep`` and the CLI accept as data, prepared once per preprocessing.

A ``data`` argument (the same for :func:`iis_fast.score`, :func:`iis_fast.sweep`, ``iis-fast score`` and
``iis-fast sweep``) is one of:

- ``"fashion-mnist"`` (or ``"fashion-mnist:n_train=2000,n_eval=1000,seed=0"``, or a :class:`FashionMNISTData`):
  class-balanced subsets of the local Fashion-MNIST TRAIN (train) and TEST (eval) splits. For each distinct
  preprocessing (input size, mean, std, crop, interpolation) of the swept models the images are decoded and
  preprocessed once into ``.npy`` files in the cache folder; workers memory-map them (:class:`ArrayLoader`),
  so nothing is decoded again per checkpoint or per worker;
- a ``.beton`` path (and optionally ``eval_data``): read with the FFCV loader
  (``iis_fast.data.loaders.resolve_loader``);
- an image folder (``folder/<class>/<image>``, and optionally an ``eval_data`` folder with the same class
  folders): read with torchvision's ``ImageFolder`` under the model's eval preprocessing;
- a ``(train_loader, eval_loader)`` pair of iterables of (images, labels) batches (local executors only; they
  are pickled to the workers).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import IISInputError

__all__ = ["FashionMNISTData", "PreparedArrays", "ArrayLoader", "DataRef", "parse_data", "prepare_data",
           "resolve_data", "DATA_SPEC_HELP"]

#: One line for --help texts: what a data spec may be.
DATA_SPEC_HELP = ("'fashion-mnist[:n_train=N,n_eval=N,seed=S]' (the local Fashion-MNIST; TRAIN subset, TEST subset as "
                  "evaluation data), an FFCV .beton file, or an image folder (folder/<class>/<image>)")


@dataclass(frozen=True)
class FashionMNISTData:
    """Fashion-MNIST subsets for a sweep: ``n_train`` TRAIN images (features, concepts) and ``n_eval`` TEST images."""

    n_train: int = 2000
    n_eval: int = 1000
    seed: int = 0
    root: str | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("n_train", "n_eval", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise IISInputError(f"fashion-mnist {name}={v!r}: must be a positive whole number"
                                    + (" (the whole split is its size: 60000 train, 10000 test)"
                                       if name != "batch_size" else ""))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise IISInputError(f"fashion-mnist seed={self.seed!r}: must be a whole number >= 0")

    @property
    def key(self) -> str:
        return f"fashion-mnist(n_train={self.n_train},n_eval={self.n_eval},seed={self.seed})"


@dataclass(frozen=True)
class PreparedArrays:
    """Preprocessed (train, eval) arrays on disk: float32 images [N, 3, H, W] and int64 labels, with fingerprints."""

    folder: str
    train_fingerprint: str
    eval_fingerprint: str
    batch_size: int

    def loaders(self) -> tuple["ArrayLoader", "ArrayLoader"]:
        """(train, eval) loaders that memory-map the arrays."""
        f = Path(self.folder)
        return (ArrayLoader(f / "train_x.npy", f / "train_y.npy", self.train_fingerprint, self.batch_size),
                ArrayLoader(f / "eval_x.npy", f / "eval_y.npy", self.eval_fingerprint, self.batch_size))


class ArrayLoader:
    """Batches (float32 images, int64 labels) of memory-mapped ``.npy`` arrays, in order; picklable (paths only).

    ``fingerprint`` identifies the data for :func:`iis_fast.features.data_fingerprint`, so feature caches
    never hash the pixels.
    """

    def __init__(self, x_path: str | os.PathLike[str], y_path: str | os.PathLike[str], fingerprint: str,
                 batch_size: int = 256) -> None:
        self.x_path, self.y_path = str(x_path), str(y_path)
        self.fingerprint = fingerprint
        self.batch_size = int(batch_size)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._x is None or self._y is None:
            self._x = np.load(self.x_path, mmap_mode="r")
            self._y = np.load(self.y_path, mmap_mode="r")
        return self._x, self._y

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_x": None, "_y": None}

    def __len__(self) -> int:
        n = self._open()[1].shape[0]
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._open()
        for i in range(0, y.shape[0], self.batch_size):
            yield torch.from_numpy(np.array(x[i:i + self.batch_size])), torch.from_numpy(np.array(y[i:i + self.batch_size]))


@dataclass(frozen=True)
class DataRef:
    """What a worker needs to build its loaders: ``kind`` is "arrays", "beton", "folder" or "loaders"."""

    kind: str
    key: str                                   # identity of the data for the config hash
    arrays: PreparedArrays | None = None
    train: Any = None                          # .beton path or loader
    eval: Any = None

    def loaders(self) -> tuple[Any, Any]:
        if self.kind == "arrays":
            assert self.arrays is not None
            return self.arrays.loaders()
        return self.train, self.eval


def parse_data(data: Any) -> Any:
    """Normalise the user's ``data`` argument: a :class:`FashionMNISTData`, a .beton or folder path, or a loader pair.

    Raises:
        IISInputError: a malformed spec or a path that does not exist (the message lists what is accepted).
    """
    if isinstance(data, FashionMNISTData):
        return data
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        name, _, rest = text.partition(":")
        if name.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist", "fmnist"):
            kw: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in rest.split(","))):
                k, _, v = part.partition("=")
                k = k.strip().replace("-", "_")
                if k not in ("n_train", "n_eval", "seed", "root", "batch_size"):
                    raise IISInputError(f"data option {k!r}: choose from n_train, n_eval, seed, root, batch_size")
                try:
                    kw[k] = v.strip() if k == "root" else int(v)
                except ValueError:
                    raise IISInputError(f"data option {k}={v!r} is not an integer") from None
            return FashionMNISTData(**kw)
        path = Path(text).expanduser()
        if path.is_dir():
            return ("folder", str(path.resolve()))
        if text.endswith(".beton"):
            if not path.is_file():
                raise IISInputError(f"data file {text!r} does not exist")
            return str(path.resolve())
        what = "does not exist" if not path.exists() else "is neither a .beton file nor an image folder"
        raise IISInputError(f"data={text!r} {what}; give {DATA_SPEC_HELP}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "__iter__") for d in data):
        return tuple(data)
    raise IISInputError(f"data of type {type(data).__name__} is not understood; give {DATA_SPEC_HELP}, "
                        "or a (train_loader, eval_loader) pair")


def _folder_classes(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_eval_folder(train: str, ev: str) -> None:
    """ImageFolder numbers classes by their sorted folder names: both folders must name the same classes, or a
    label would silently mean another class in evaluation."""
    a, b = _folder_classes(train), _folder_classes(ev)
    if not a:
        raise IISInputError(f"image folder {train!r} has no class sub-folders (expected folder/<class>/<image>)")
    if a != b:
        only_t, only_e = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise IISInputError(
            f"the evaluation folder {ev!r} does not have the training folder's classes "
            f"(only in train: {only_t[:5]}, only in eval: {only_e[:5]}); class indices would not correspond")


def _preprocessing_key(pre: dict[str, Any]) -> dict[str, Any]:
    return {"input_size": list(pre["input_size"]), "mean": list(pre["mean"]), "std": list(pre["std"]),
            "crop_pct": float(pre.get("crop_pct", 1.0)), "interpolation": str(pre.get("interpolation", "bilinear"))}


def prepare_data(data: Any, pre: dict[str, Any], cache_dir: str | os.PathLike[str], eval_data: Any = None
                 ) -> DataRef:
    """Build the :class:`DataRef` of ``data`` under preprocessing ``pre`` (``iis_fast.models.preprocessing_config``).

    Fashion-MNIST is decoded and preprocessed here, once per preprocessing, into ``cache_dir/sweep-data/<key>``
    (reused by later sweeps); other data kinds are passed through.
    """
    data = parse_data(data)
    if isinstance(data, tuple) and len(data) == 2 and data[0] == "folder":
        ev = None
        if eval_data is not None:
            ev_parsed = parse_data(eval_data)
            if not (isinstance(ev_parsed, tuple) and ev_parsed[0] == "folder"):
                raise IISInputError(f"eval_data={eval_data!r}: with an image folder as data, give an image folder")
            ev = ev_parsed[1]
            _check_eval_folder(data[1], ev)
        elif not _folder_classes(data[1]):
            raise IISInputError(f"image folder {data[1]!r} has no class sub-folders (expected folder/<class>/<image>)")
        return DataRef("folder", "folder:" + data[1] + ("|" + ev if ev else ""), train=data[1], eval=ev)
    if isinstance(data, str):
        ev = None
        if eval_data is not None:
            ev = parse_data(eval_data)
            if not isinstance(ev, str):
                raise IISInputError(f"eval_data={eval_data!r}: with a .beton file as data, give a .beton file")
        key = "beton:" + data + ("|" + ev if ev else "")
        return DataRef("beton", key, train=data, eval=ev)
    if eval_data is not None and isinstance(data, FashionMNISTData):
        raise IISInputError("eval_data is not used with fashion-mnist data (its TEST split is the evaluation data)")
    if isinstance(data, tuple):
        from ..features import data_fingerprint
        key = "loaders:" + data_fingerprint(data[0]) + "|" + data_fingerprint(data[1])
        return DataRef("loaders", key, train=data[0], eval=data[1])
    assert isinstance(data, FashionMNISTData)
    from ..data import FashionMNIST, load_fashion_mnist, stratified_subset

    pk = _preprocessing_key(pre)
    size = tuple(pk["input_size"][1:])
    kw = dict(image_size=size, mean=pk["mean"], std=pk["std"], root=data.root, crop_pct=pk["crop_pct"],
              interpolation=pk["interpolation"] if pk["interpolation"] in ("bilinear", "bicubic", "nearest")
              else "bilinear")
    sets = {}
    for name, split, n in (("train", "train", data.n_train), ("eval", "test", data.n_eval)):
        labels = load_fashion_mnist(split, data.root)[1]
        if n > len(labels):
            arg = "n_train" if name == "train" else "n_eval"
            raise IISInputError(f"fashion-mnist {arg}={n}, but its {split.upper()} split has {len(labels)} images: "
                                f"give {arg} <= {len(labels)}")
        idx = None if n == len(labels) else stratified_subset(labels, int(n), data.seed)
        sets[name] = FashionMNIST(split, indices=idx, **kw)
    folder_key = hashlib.sha256(json.dumps([sets["train"].fingerprint, sets["eval"].fingerprint]).encode()
                                ).hexdigest()[:24]
    folder = Path(cache_dir) / "sweep-data" / folder_key
    if not (folder / "done.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        from ..features import make_shared_temp_dir
        tmp = make_shared_temp_dir(folder.parent, f".{folder_key}.")      # follows the umask, as the cache
        for name, ds in sets.items():
            xs = np.lib.format.open_memmap(tmp / f"{name}_x.npy", mode="w+", dtype=np.float32,
                                           shape=(len(ds), 3, *size))
            for i in range(0, len(ds), 1024):
                items = ds.__getitems__(list(range(i, min(i + 1024, len(ds)))))
                xs[i:i + len(items)] = torch.stack([t for t, _ in items]).numpy()
            xs.flush()
            del xs
            np.save(tmp / f"{name}_y.npy", np.asarray(ds.targets, dtype=np.int64))
        (tmp / "done.json").write_text(json.dumps({"preprocessing": pk, "data": asdict(data),
                                                   "train": sets["train"].fingerprint,
                                                   "eval": sets["eval"].fingerprint}))
        try:
            os.replace(tmp, folder)
        except OSError:                          # another sweep prepared it concurrently
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    arrays = PreparedArrays(str(folder), sets["train"].fingerprint, sets["eval"].fingerprint, data.batch_size)
    return DataRef("arrays", data.key, arrays=arrays)


def resolve_data(data: Any, eval_data: Any, pre: dict[str, Any], *, cache_dir: str | os.PathLike[str],
                 batch_size: int, device: str) -> tuple[Any, Any]:
    """(train, eval) iterables of (images, labels) batches for :func:`iis_fast.score`.

    A data spec string (see the module docstring) is prepared under the model's preprocessing ``pre``; a loader
    or any other iterable is returned as is (``eval`` may be None: score holds out part of train).
    """
    from .loaders import resolve_loader

    def loader(x: Any) -> Any:
        if x is None:
            return None
        return resolve_loader(x, image_size=tuple(pre["input_size"][1:]), mean=pre["mean"], std=pre["std"],
                              batch_size=batch_size, device=device)

    if not isinstance(data, (str, os.PathLike, FashionMNISTData)):
        return loader(data), loader(eval_data)
    ref = prepare_data(data, pre, cache_dir, eval_data)
    train, ev = ref.loaders()
    return loader(train), loader(ev)
