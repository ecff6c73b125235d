"""Representations (docs/spec.md §1.1): which vector of a backbone is "the feature", its extraction, and the disk cache.

Features are computed once per (model weights, layer, data, preprocessing) and stored as .npy files that later
runs memory-map, so a second score of the same checkpoint never runs the backbone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .errors import IISInputError

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def _pool(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise IISInputError(f"{where} returned {type(out).__name__}, not a tensor")
    if out.dim() == 4:                      # [B, C, H, W] -> global average pool
        return out.mean(dim=(2, 3))
    if out.dim() == 3:                      # [B, T, D] tokens -> CLS token
        return out[:, 0]
    return out.flatten(1)


def _find_classifier(model: nn.Module) -> nn.Module | None:
    """The final Linear of a torchvision-style model (its input is the penultimate representation)."""
    for name in ("fc", "classifier", "head", "heads", "last_linear"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            return mod
        if isinstance(mod, nn.Module):
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


EXTRACT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}


def resolve_extract_dtype(extract_dtype: str, device: str | torch.device) -> str:
    """The backbone's compute dtype for extraction: ``extract_dtype`` itself, or for ``"auto"`` the measured
    default of the device (docs/throughput.md): ``bfloat16`` on a CUDA GPU, and on a CPU with native bf16
    (AVX-512 BF16 / AMX), ``float32`` elsewhere. Features are always stored as float32."""
    if extract_dtype != "auto":
        if extract_dtype not in EXTRACT_DTYPES:
            raise IISInputError(f"extract_dtype={extract_dtype!r}: choose auto, {', '.join(EXTRACT_DTYPES)}")
        return extract_dtype
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16"
    if dev.type == "cpu" and _cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def representation_fn(model: nn.Module, layer: str | None = None, *, dtype: str = "float32",
                      channels_last: bool = False, compile: bool = False, fold_bn: bool = False) -> EmbedFn:
    """A function images -> [B, D] float32 representation of `model` (in eval mode, inference mode).

    - `layer` given: the (pooled) output of that named submodule;
    - timm models: ``forward_head(forward_features(x), pre_logits=True)``;
    - torchvision-style models: the input of the final classifier Linear.

    Speed options (the numbers they change are measured in docs/throughput.md): ``dtype`` runs the backbone
    under ``torch.autocast`` in bfloat16 or float16; ``channels_last`` converts the model and every batch to
    channels-last memory format (same fp32 math, faster convolutions); ``fold_bn`` extracts with a copy of the
    model whose eval-mode BatchNorms are folded into their convolutions (:func:`iis_fast.models.fold.fold_batchnorm`,
    found and checked on the first batch; a copy that fails the check is not used, with a warning); ``compile``
    wraps the forward in ``torch.compile`` (layer hooks excluded).
    """
    model.eval()
    if dtype not in EXTRACT_DTYPES:
        raise IISInputError(f"dtype={dtype!r}: choose one of {', '.join(EXTRACT_DTYPES)}")
    _raw_fn(model, layer, False)            # finds the representation now, or says why it cannot
    amp = EXTRACT_DTYPES[dtype]
    state: dict[str, EmbedFn] = {}

    def build(x: torch.Tensor) -> EmbedFn:
        net = model
        if fold_bn:
            from .models.fold import fold_batchnorm
            sample = x[:8].float()
            net, _, note = fold_batchnorm(model, lambda m: _raw_fn(m, layer, False)(sample))
            if note:
                from .errors import IISWarning
                warnings.warn(note, IISWarning, stacklevel=3)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        return _raw_fn(net, layer, compile)

    def embed(x: torch.Tensor) -> torch.Tensor:
        if "raw" not in state:
            with torch.no_grad():
                state["raw"] = build(x)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp != torch.float32):
            out = state["raw"](x).float()
        return out.clone()          # a normal tensor (inference tensors cannot enter autograd later)
    return embed


def _raw_fn(model: nn.Module, layer: str | None, compile: bool) -> EmbedFn:
    """The representation forward of ``model`` as it stands (no dtype, memory-format or mode handling); an
    :class:`IISInputError` when ``layer`` is not a submodule or the model has no representation to find."""
    if layer is not None:
        try:
            sub = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][-8:]
            raise IISInputError(f"layer={layer!r} is not a submodule of {type(model).__name__}; "
                                f"the last few are {names}") from None
        return _hooked(model, sub, lambda mod, inp, out: _pool(out, f"layer {layer!r}"), forward=True)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        def raw(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
        return torch.compile(raw, dynamic=True) if compile else raw
    clf = _find_classifier(model)
    if clf is None:
        raise IISInputError(f"cannot find the representation of {type(model).__name__}: it is neither a timm "
                            "model nor has a final classifier Linear (fc/classifier/head); pass layer='<module name>'")
    return _hooked(model, clf, lambda mod, inp: inp[0].flatten(1), forward=False)


def _hooked(model: nn.Module, sub: nn.Module, grab: Callable, forward: bool) -> EmbedFn:
    def embed(x: torch.Tensor) -> torch.Tensor:
        box: list[torch.Tensor] = []
        if forward:
            h = sub.register_forward_hook(lambda m, i, o: box.append(grab(m, i, o)))
        else:
            h = sub.register_forward_pre_hook(lambda m, i: box.append(grab(m, i)))
        try:
            model(x)
        finally:
            h.remove()
        return box[0]
    return embed


def model_fingerprint(model: nn.Module, layer: str | None = None) -> str:
    """Hash of the architecture, every parameter/buffer and the layer: equal weights give equal keys."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(str(layer).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:32]


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        batch = (batch.get("image", batch.get("images")), batch.get("label", batch.get("labels")))
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise IISInputError("the loader must yield (images, labels) batches; got "
                            f"{type(batch).__name__}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise IISInputError(f"loader images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise IISInputError(f"loader batch has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def data_fingerprint(loader: Iterable) -> str:
    """A key for the data a loader yields: its own `fingerprint` if it has one, else a hash of what it yields."""
    for obj in (loader, getattr(loader, "dataset", None)):
        fp = getattr(obj, "fingerprint", None)
        if isinstance(fp, str) and fp:
            return fp
    ds = getattr(loader, "dataset", None)
    h = hashlib.sha256()
    if isinstance(ds, torch.utils.data.TensorDataset):
        for t in ds.tensors:
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "tensors-" + h.hexdigest()[:32]
    n = 0
    for batch in loader:
        images, labels = _split_batch(batch)
        h.update(images.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(labels.cpu().numpy().astype(np.int64).tobytes())
        n += len(labels)
    return f"stream{n}-" + h.hexdigest()[:32]


@dataclass
class Extracted:
    """Features of one split and the concept-source images kept while streaming."""

    x: np.ndarray                     # [N, D] float32 (possibly memory-mapped)
    y: np.ndarray                     # [N] int64
    source_images: torch.Tensor | None = None   # first `keep_per_class` images of each class, as the loader gave them
    source_labels: torch.Tensor | None = None
    source_index: np.ndarray | None = None      # their sample indices


def extract(embed: EmbedFn, loader: Iterable, device: str = "cpu", keep_per_class: int = 0,
            progress: bool = True, desc: str = "extracting features") -> Extracted:
    """Run the backbone over every batch of `loader`; keep the first `keep_per_class` images of each class."""
    from tqdm.auto import tqdm
    xs, ys, kept, kept_y, kept_i = [], [], [], [], []
    seen: dict[int, int] = {}
    n = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False):
        images, labels = _split_batch(batch)
        feats = embed(images.to(device, non_blocking=True).float())
        if feats.dim() != 2 or feats.shape[0] != images.shape[0]:
            raise IISInputError(f"the representation has shape {tuple(feats.shape)} for a batch of {images.shape[0]}")
        xs.append(feats.float().cpu().numpy())
        ys.append(labels.cpu().numpy().astype(np.int64))
        if keep_per_class:
            for j, c in enumerate(ys[-1].tolist()):
                if seen.get(c, 0) < keep_per_class:
                    seen[c] = seen.get(c, 0) + 1
                    kept.append(images[j].detach().cpu().clone())
                    kept_y.append(c)
                    kept_i.append(n + j)
        n += len(labels)
    if n == 0:
        raise IISInputError("the loader yielded no samples (an empty loader or dataset)")
    out = Extracted(np.concatenate(xs), np.concatenate(ys))
    if keep_per_class:
        out.source_images = torch.stack(kept)
        out.source_labels = torch.tensor(kept_y)
        out.source_index = np.asarray(kept_i)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("IIS_FAST_CACHE", Path.home() / ".cache" / "iis_fast"))


class _CorruptEntry(Exception):
    """Inside :class:`FeatureCache`: an entry that cannot be trusted (a warning and a miss for the caller)."""


class _StaleEntry(Exception):
    """Inside :class:`FeatureCache`: an entry of another :data:`CACHE_FORMAT` (a silent miss: old, not corrupt)."""


#: meta.json format of a cache entry; an entry of another format (an older iis_fast) is a miss and is rewritten.
CACHE_FORMAT = 2
#: entry directory -> (inode, size, mtime, ctime) of its files when this process last verified their checksums.
_VERIFIED: dict[str, tuple] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (about 1.4 GB/s here: a 300 MB feature matrix in 0.2 s)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_shared_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` whose mode follows the umask (``tempfile.mkdtemp`` would make
    it ``drwx------``, unreadable by the group that shares a cache)."""
    for _ in range(100):
        d = parent / f"{prefix}{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a unique temporary directory in {parent}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class FeatureCache:
    """A directory of entries ``{key}/{name}.npy`` + ``meta.json``, written atomically, read memory-mapped.

    Integrity: ``meta.json`` records every array's SHA-256, byte size, shape and dtype. :meth:`get` checks sizes,
    shapes and dtypes on every read and the checksums once per process per entry (``verify="once"``, again when
    a file's inode, size or timestamps change) or on every read (``verify="always"``). An entry that fails (bytes
    changed, a truncated or zero-byte ``.npy``, a listed array missing, ``meta.json`` unreadable, the entry
    replaced by a file) is reported with an :class:`~iis_fast.errors.IISWarning` and treated as a miss, so the
    caller recomputes it and :meth:`put` replaces it.

    Concurrency: :meth:`put` writes into a private temporary directory and renames it into place. If another
    process put the same key first and its entry verifies, that entry is kept and this one dropped (same key, same
    content); a bad entry in the way is moved aside first. Readers see no entry or a complete one, never a mix.
    Entries follow the process umask (a group-shared cache stays readable by the group).
    """

    def __init__(self, root: str | os.PathLike | None = None, verify: str = "once"):
        if verify not in ("once", "always"):
            raise IISInputError(f"verify={verify!r}: choose 'once' (per process and entry) or 'always'")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.verify = verify

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]

    def get(self, key: str, required: Iterable[str] = ()) -> dict[str, Any] | None:
        """The entry's arrays (memory-mapped) and ``"meta"`` (its info), or None when absent or untrustworthy.

        Args:
            key: the entry.
            required: array names the caller needs; an entry without one of them is a miss.
        """
        d = self.root / key
        if not os.path.lexists(d):
            return None
        try:
            return self._read(d, tuple(required), self.verify == "always")
        except _StaleEntry:
            return None
        except _CorruptEntry as e:
            from .errors import IISWarning
            warnings.warn(f"feature cache entry {d} {e}; recomputing it", IISWarning, stacklevel=2)
            return None

    def _read(self, d: Path, required: tuple[str, ...], always: bool) -> dict[str, Any]:
        if not d.is_dir():
            raise _CorruptEntry("is not a directory")
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            raise _CorruptEntry("has no meta.json") from None
        except (OSError, ValueError) as e:
            raise _CorruptEntry(f"has an unreadable meta.json ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise _StaleEntry()
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise _CorruptEntry("has a meta.json without its file list")
        missing = [n for n in required if n not in files]
        if missing:
            raise _CorruptEntry(f"lacks the array(s) {missing}")
        sig = []
        for name, rec in files.items():
            try:
                st = os.stat(d / f"{name}.npy")
            except FileNotFoundError:
                raise _CorruptEntry(f"lists {name}.npy, which is missing") from None
            if st.st_size != rec["bytes"]:
                raise _CorruptEntry(f"has {name}.npy of {st.st_size} bytes, but {rec['bytes']} were written")
            sig.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        sig_t = tuple(sig)
        if always or _VERIFIED.get(str(d)) != sig_t:
            for name, rec in files.items():
                if file_sha256(d / f"{name}.npy") != rec["sha256"]:
                    raise _CorruptEntry(f"has {name}.npy whose bytes no longer match the checksum written with "
                                              "it (changed or corrupted on disk)")
            _VERIFIED[str(d)] = sig_t
        arrays: dict[str, Any] = {}
        for name, rec in files.items():
            try:
                a = np.load(d / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                _VERIFIED.pop(str(d), None)
                raise _CorruptEntry(f"has an unreadable {name}.npy ({e})") from None
            if list(a.shape) != rec["shape"] or a.dtype.str != rec["dtype"]:
                _VERIFIED.pop(str(d), None)
                raise _CorruptEntry(f"has {name}.npy of shape {list(a.shape)} {a.dtype.str}, but "
                                          f"{rec['shape']} {rec['dtype']} were written")
            arrays[name] = a
        return {"meta": meta.get("info", {}), **arrays}

    def put(self, key: str, arrays: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> None:
        """Store ``arrays`` under ``key`` (see the class docstring for atomicity and concurrent writers)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = make_shared_temp_dir(self.root, f".{key}.")
        try:
            files = {}
            for n, a in arrays.items():
                a = np.ascontiguousarray(a)
                p = tmp / f"{n}.npy"
                np.save(p, a)
                files[n] = {"sha256": file_sha256(p), "bytes": p.stat().st_size, "shape": list(a.shape),
                            "dtype": a.dtype.str}
            (tmp / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "files": files, "info": info or {}}))
            self._install(tmp, self.root / key, list(files))
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, final: Path, names: list[str]) -> None:
        """Rename ``tmp`` onto ``final``; keep a verified entry another writer put there first."""
        for _ in range(20):
            try:
                os.rename(tmp, final)             # atomic; refuses to replace a non-empty directory or a file
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
            else:
                sig = []
                for n in names:
                    st = os.stat(final / f"{n}.npy")
                    sig.append((n, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                _VERIFIED[str(final)] = tuple(sig)    # written and hashed by us just now
                return
            try:
                self._read(final, tuple(names), always=False)
                return                            # another writer won with a good entry: keep theirs
            except (_CorruptEntry, _StaleEntry):
                pass
            except FileNotFoundError:
                continue                          # it vanished while we looked: try the rename again
            aside = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(6)}.bad")
            try:
                os.rename(final, aside)           # only one process gets to move a given bad entry
            except FileNotFoundError:
                continue
            _VERIFIED.pop(str(final), None)
            _remove(aside)
        raise OSError(f"could not install cache entry {final}: it keeps being replaced by other writers")
