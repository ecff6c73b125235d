"""Writing FFCV ``.beton`` files (image folder, torch dataset, numpy arrays, Fashion-MNIST), atomically and checksummed.

Hand-written because FFCV's own ``DatasetWriter.from_indexed_dataset`` hangs when a worker dies: its worker
processes swallow exceptions and the parent then waits forever for the missing samples.

Instead, threads load/convert/encode samples (PIL, OpenCV and the JPEG encoder release the GIL) and the calling
thread lays them out with FFCV's own ``MemoryAllocator`` and header/metadata/allocation-table code, so the file
format is FFCV's, byte for byte (see :mod:`iis_fast.data.beton`). Every file has two fields, ``image`` (an FFCV
``RGBImageField``: 3-channel uint8, stored raw or as JPEG) and ``label`` (an ``IntField``), in that order, and
carries its SHA-256 (see :mod:`iis_fast.data.beton`).

Writing is atomic: samples go to ``<path>.tmp-XXXXXX`` in the same directory, which is renamed onto ``path``
(``os.replace``) only after the header and the allocation table are complete. A write that raises removes its
temporary file; a write that is killed (SIGKILL, power loss) leaves at most a ``*.tmp-*`` file, never a file at
``path``.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFileError, IISInputError
from ..validation import label_bound, usable_cores
from .beton import (CHECKSUM_MAGIC, IMAGE_FIELD, LABEL_FIELD, MIN_PAGE, MODES, VERIFIED, BetonInfo,
                    checksum_offset, ffcv_module, file_checksum, validate_beton)

__all__ = ["IMAGE_EXTENSIONS", "write_arrays", "write_dataset", "write_fashion_mnist", "write_image_folder"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _channels_of(image: Any) -> int:
    """Channel count of a PIL image or an HW/HWC array (a palette image counts as 3)."""
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            return 3 if image.mode == "P" else len(image.getbands())
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(image)
    return 1 if a.ndim == 2 else int(a.shape[-1])


def _to_rgb_u8(image: Any, where: str) -> np.ndarray:
    """A PIL image or HW/HWC array (1, 3 or 4 channels, uint8) -> contiguous uint8 HxWx3."""
    from PIL import Image
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)
    a = np.asarray(image)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise IISInputError(f"{where}: images must be uint8 (0..255), got dtype {a.dtype}; convert with "
                            "(x * 255).round().astype(np.uint8) for [0, 1] floats")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise IISInputError(f"{where}: image of shape {a.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
    if min(a.shape[:2]) < 1 or max(a.shape[:2]) > 65535:
        raise IISInputError(f"{where}: image side {a.shape[:2]} is outside 1..65535")
    return np.ascontiguousarray(a[..., :3])


def _check_label(label: Any, where: str, num_classes: int | None, out: Any) -> int:
    """An int label in range, else DataFileError naming the output file and the sample."""
    ok = isinstance(label, (int, np.integer)) and not isinstance(label, bool)
    if not ok and getattr(label, "ndim", 1) == 0 and hasattr(label, "dtype"):   # a 0-d numpy array or tensor
        ok = np.issubdtype(np.asarray(label).dtype, np.integer)
    if not ok:
        raise DataFileError(f"cannot write {os.fspath(out)!r}: {where} has label {label!r}, not an integer class index")
    lab = int(label)
    if lab < 0 or lab >= label_bound(num_classes):
        raise DataFileError(f"cannot write {os.fspath(out)!r}: {where} has label {lab}, out of range (labels must "
                            f"be 0..{label_bound(num_classes) - 1})")
    return lab


def _check_mode(write_mode: str, jpeg_quality: int, max_resolution: int | None) -> str:
    mode = {"jpeg": "jpg"}.get(write_mode, write_mode)
    if mode not in MODES:
        raise IISInputError(f"write_mode must be 'raw' or 'jpeg', got {write_mode!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise IISInputError(f"jpeg_quality must be in 1..100, got {jpeg_quality!r}")
    if max_resolution is not None and (isinstance(max_resolution, bool) or int(max_resolution) < 1):
        raise IISInputError(f"max_resolution must be a positive int or None, got {max_resolution!r}")
    return mode


def _default_workers(num_workers: int | None) -> int:
    """Writer threads: ``num_workers`` (default: up to 8), never above the usable cores."""
    cores = usable_cores()
    if num_workers is None:
        return max(1, min(cores, 8))
    if isinstance(num_workers, bool) or int(num_workers) < 1:
        raise IISInputError(f"num_workers must be a positive integer, got {num_workers!r}")
    return max(1, min(int(num_workers), cores))


def _write(
    path: str | os.PathLike[str],
    n: int,
    load: Callable[[int], tuple[Any, Any]],
    where: Callable[[int], str],
    *,
    write_mode: str,
    max_resolution: int | None,
    jpeg_quality: int,
    num_classes: int | None,
    mixed_channels: str,
    num_workers: int | None,
    progress: bool,
    desc: str,
    page_size: int,
    classes: tuple[str, ...] | None = None,
) -> BetonInfo:
    """Write ``n`` samples ``load(i) -> (image, label)`` atomically to ``path``; return its validated info."""
    ffcv_module()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import encode_jpeg, resizer
    from ffcv.memory_allocator import MemoryAllocator
    from tqdm.auto import tqdm

    mode = _check_mode(write_mode, jpeg_quality, max_resolution)
    if mixed_channels not in ("error", "convert"):
        raise IISInputError(f"mixed_channels must be 'error' or 'convert', got {mixed_channels!r}")
    if n < 1:
        raise IISInputError(f"nothing to write to {os.fspath(path)!r}: the data holds no samples")
    if page_size < MIN_PAGE or page_size & (page_size - 1):
        raise IISInputError(f"page_size must be a power of two >= {MIN_PAGE}, got {page_size}")
    final = Path(os.fspath(path)).expanduser().resolve()
    if final.is_dir():
        raise IISInputError(f"output path {str(final)!r} is a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    workers = _default_workers(num_workers)
    first_channels: list[int] = []

    def prepare(i: int) -> tuple[int, int, int, np.ndarray, int]:
        image, label = load(i)
        lab = _check_label(label, where(i), num_classes, path)
        ch = _channels_of(image)
        if mixed_channels == "error":
            if not first_channels:
                first_channels.append(ch)  # set by sample 0, which is prepared first (see below)
            elif ch != first_channels[0]:
                raise DataFileError(
                    f"cannot write {os.fspath(path)!r}: {where(i)} has {ch} channel(s) but {where(0)} has {first_channels[0]}: images of mixed "
                    f"channel counts; pass mixed_channels='convert' to store all of them as RGB"
                )
        a = resizer(_to_rgb_u8(image, where(i)), max_resolution)
        if a.shape[0] > 65535 or a.shape[1] > 65535:
            raise IISInputError(f"{where(i)}: image {a.shape[:2]} too large for FFCV (max side 65535)")
        if mode == "jpg":
            data = encode_jpeg(np.ascontiguousarray(a), int(jpeg_quality))
        else:
            data = np.ascontiguousarray(a).reshape(-1)
        return MODES[mode], a.shape[0], a.shape[1], data, lab

    fd, tmp_name = tempfile.mkstemp(prefix=final.name + ".tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fields = {IMAGE_FIELD: RGBImageField(write_mode=mode, max_resolution=max_resolution,
                                             jpeg_quality=jpeg_quality),
                  LABEL_FIELD: IntField()}
        header, data_start, meta = _prepare(tmp, fields, n, page_size)
        img_meta, lab_meta = meta[IMAGE_FIELD], meta[LABEL_FIELD]
        allocator = MemoryAllocator(str(tmp), data_start, page_size)
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
        with allocator:
            first = prepare(0)
            for i, (m, hh, ww, data, lab) in enumerate(_ordered_map(prepare, range(1, n), workers, first)):
                if data.nbytes > page_size:
                    raise IISInputError(f"{where(i)}: encoded image of {data.nbytes} bytes exceeds the FFCV page "
                                        f"size {page_size}; lower max_resolution or raise page_size")
                for attempt in range(2):
                    allocator.set_current_sample(i)
                    try:
                        ptr, buf = allocator.malloc(data.nbytes)
                        break
                    except MemoryError:  # the sample started on a full page: FFCV retries on a fresh one
                        if attempt:
                            raise
                buf[:] = data
                img_meta["mode"][i], img_meta["height"][i], img_meta["width"][i] = m, hh, ww
                img_meta["data_ptr"][i] = ptr
                lab_meta[i] = lab
                bar.update(1)
        bar.close()
        _finalize(tmp, header, data_start - meta.nbytes, meta, allocator.allocations)
        _write_checksum(tmp, list(fields).index(LABEL_FIELD))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = final.stat()
    VERIFIED[str(final)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)   # hashed just now
    info = validate_beton(final, num_classes=num_classes)
    return dataclasses.replace(info, classes=classes)


def _write_checksum(path: Path, label_index: int) -> None:
    """Store the file's SHA-256 (magic + digest) in its label field's argument bytes, which are zero until now."""
    args_at = checksum_offset(label_index)
    with open(path, "r+b") as f:
        f.seek(args_at)
        f.write(CHECKSUM_MAGIC)
        f.flush()
        digest = bytes.fromhex(file_checksum(path, args_at))
        f.seek(args_at + len(CHECKSUM_MAGIC))
        f.write(digest)
        f.flush()
        os.fsync(f.fileno())


def _prepare(tmp: Path, fields: dict[str, Any], n: int, page_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Write FFCV's header placeholder and field descriptors (as ``DatasetWriter.prepare``, without its shared
    memory, which a killed process would leak in /dev/shm); return (header, data region start, metadata)."""
    from ffcv.types import CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType
    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"], header["num_samples"] = CURRENT_VERSION, n
    header["num_fields"], header["page_size"] = len(fields), page_size
    desc = np.zeros(len(fields), dtype=FieldDescType)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, field) in enumerate(fields.items()):
        enc = np.frombuffer(name.encode("ascii"), dtype="<u1")
        desc[i]["type_id"] = type_ids[type(field)]
        desc[i]["name"][:enc.size] = enc
        desc[i]["arguments"][:] = field.to_binary()[0]
    meta_type = np.dtype([(k, f.metadata_type) for k, f in fields.items()], align=True)
    meta = np.zeros(n, dtype=meta_type)
    with open(tmp, "wb") as f:
        f.write(header.tobytes())  # alloc_table_ptr = 0 until finalised: an unfinished file never validates
        f.write(desc.tobytes())
    return header, HeaderType.itemsize + desc.nbytes + meta.nbytes, meta


def _finalize(tmp: Path, header: np.ndarray, meta_start: int, meta: np.ndarray, allocations: list[Any]) -> None:
    """Metadata, then the allocation table at the end, then the real header (as ``DatasetWriter.finalize``)."""
    from ffcv.types import ALLOC_TABLE_TYPE
    table = np.array(allocations, dtype=ALLOC_TABLE_TYPE) if allocations else np.zeros(0, ALLOC_TABLE_TYPE)
    with open(tmp, "r+b") as f:
        f.seek(meta_start)
        f.write(meta.tobytes())
        end = f.seek(0, os.SEEK_END)
        f.write(table.tobytes())
        header["alloc_table_ptr"] = end
        f.seek(0)
        f.write(header.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _ordered_map(fn: Callable[[int], Any], items: range, workers: int, first: Any) -> Iterator[Any]:
    """``first`` then ``fn(i)`` for ``items`` in order, computed by ``workers`` threads with bounded look-ahead."""
    yield first
    if workers <= 1:
        for i in items:
            yield fn(i)
        return
    window = 8 * workers
    with ThreadPoolExecutor(workers) as ex:
        pending: list[Any] = []
        it = iter(items)
        try:
            for i in it:
                pending.append(ex.submit(fn, i))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def write_arrays(
    images: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    path: str | os.PathLike[str],
    *,
    write_mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    num_classes: int | None = None,
    mixed_channels: str = "error",
    num_workers: int | None = None,
    progress: bool = True,
    page_size: int = 1 << 23,
) -> BetonInfo:
    """Write numpy images and integer labels to an FFCV ``.beton`` file.

    Args:
        images: uint8 ``[N, H, W]``, ``[N, H, W, 1|3]`` or ``[N, 1|3, H, W]`` (channels-first is detected when the
            last axis is not 1/3/4), or a sequence of HW/HWC uint8 arrays (sizes may differ). Grey is stored as RGB.
        labels: ``N`` integer class indices ``>= 0`` (``< num_classes`` if given).
        path: output file (written atomically).
        write_mode: ``"raw"`` (exact pixels) or ``"jpeg"``.
        max_resolution: shrink (INTER_AREA) images whose longer side exceeds this; never enlarges.
        jpeg_quality: 1..100 for JPEG storage.
        num_classes: if given, labels must be below it.
        mixed_channels: ``"error"`` (default): a sequence whose images differ in channel count is refused;
            ``"convert"``: store all as RGB.
        num_workers: threads for conversion/encoding (default: the core count; never above it).
        progress: show a tqdm bar.
        page_size: FFCV page size (power of two >= 2 MiB, larger than any encoded image).

    Returns:
        The written file's :class:`BetonInfo`.

    Raises:
        IISInputError: bad shapes, dtypes or labels (checked before writing for arrays).
        DataFileError: images of mixed channel counts.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
        raise IISInputError(f"labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(0, 2, 3, 1)
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3, 4)):
            raise IISInputError(f"images must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1/3, got {images.shape}")
        if arr.dtype != np.uint8:
            raise IISInputError(f"images must be uint8 (0..255), got dtype {arr.dtype}")
        seq: Any = arr
    else:
        seq = list(images)
        chans = {_channels_of(a) for a in seq}
        if len(chans) > 1 and mixed_channels == "error":
            counts = {c: sum(1 for a in seq if _channels_of(a) == c) for c in sorted(chans)}
            raise DataFileError(f"cannot write {os.fspath(path)!r}: the images have mixed channel counts "
                                f"{counts} (channels: number of images); pass mixed_channels='convert' to store all of them as RGB")
    if len(seq) != lab.shape[0]:
        raise IISInputError(f"cannot write {os.fspath(path)!r}: images ({len(seq)}) and labels ({lab.shape[0]}) "
                            "differ in length")
    top = label_bound(num_classes)
    if lab.size and (lab.min() < 0 or lab.max() >= top):
        i = int(np.argmin(lab)) if lab.min() < 0 else int(np.argmax(lab))
        _check_label(lab[i], f"array image {i}", num_classes, path)
    return _write(path, len(seq), lambda i: (seq[i], lab[i]), lambda i: f"array image {i}",
                  write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                  num_classes=num_classes, mixed_channels=mixed_channels, num_workers=num_workers,
                  progress=progress, desc=f"writing {Path(os.fspath(path)).name}", page_size=page_size)


def write_dataset(
    dataset: Any,
    path: str | os.PathLike[str],
    *,
    indices: Sequence[int] | None = None,
    write_mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    num_classes: int | None = None,
    mixed_channels: str = "error",
    num_workers: int | None = None,
    progress: bool = True,
    page_size: int = 1 << 23,
) -> BetonInfo:
    """Write a map-style dataset of ``(PIL image or uint8 array, int label)`` to an FFCV ``.beton`` file.

    ``dataset[i]`` must return the image *before* any tensor transform (a torchvision dataset with
    ``transform=None``). Items are read by ``num_workers`` threads (the dataset must tolerate that; pass
    ``num_workers=1`` otherwise). Labels are checked as they are written (``dataset.targets`` first, if present);
    a bad item aborts the write and leaves no file. Other arguments as in :func:`write_arrays`.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise IISInputError(f"dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}")
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        t = np.asarray(targets)[idx]
        if t.size and np.issubdtype(t.dtype, np.integer) and (
                t.min() < 0 or t.max() >= label_bound(num_classes)):
            i = int(np.argmin(t)) if t.min() < 0 else int(np.argmax(t))
            _check_label(t[i], f"dataset item {int(idx[i])}", num_classes, path)

    def load(i: int) -> tuple[Any, Any]:
        item = dataset[int(idx[i])]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise IISInputError(f"dataset item {int(idx[i])} is {type(item).__name__}, not (image, label)")
        return item[0], item[1]

    return _write(path, len(idx), load, lambda i: f"dataset item {int(idx[i])}",
                  write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                  num_classes=num_classes, mixed_channels=mixed_channels, num_workers=num_workers,
                  progress=progress, desc=f"writing {Path(os.fspath(path)).name}", page_size=page_size)


def _scan_folder(folder: Path, extensions: Sequence[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    if not folder.is_dir():
        raise DataFileError(f"image folder {str(folder)!r} does not exist or is not a directory")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFileError(f"image folder {str(folder)!r} has no class subfolders (expected folder/<class>/<image>)")
    exts = tuple(e.lower() for e in extensions)
    samples = []
    for c, name in enumerate(classes):
        for root, dirs, files in os.walk(folder / name, followlinks=True):
            dirs.sort()
            for fn in sorted(files):
                if fn.lower().endswith(exts):
                    samples.append((Path(root) / fn, c))
    if not samples:
        raise DataFileError(f"image folder {str(folder)!r} holds no images with extensions {list(exts)}")
    return classes, samples


def write_image_folder(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    write_mode: str = "jpeg",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    mixed_channels: str = "error",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    num_workers: int | None = None,
    progress: bool = True,
    page_size: int = 1 << 23,
) -> BetonInfo:
    """Write an image folder (``folder/<class>/**/<image>``, classes in sorted order) to an FFCV ``.beton`` file.

    Labels are class indices in sorted subfolder order (as torchvision's ``ImageFolder``); files are taken in
    sorted order. Before writing, every file's header is opened (cheap) so an unreadable image or images of mixed
    channel counts fail fast, naming the file. Other arguments as in :func:`write_arrays`; ``BetonInfo.classes``
    holds the class names (they are not stored in the file).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(os.fspath(folder)).expanduser()
    classes, samples = _scan_folder(root, extensions)
    first_ch = None
    for f, _ in samples:
        try:
            with Image.open(f) as im:
                ch = 3 if im.mode == "P" else len(im.getbands())
        except (OSError, UnidentifiedImageError) as e:
            raise DataFileError(f"image file {str(f)!r} cannot be read as an image: {e}") from None
        if first_ch is None:
            first_ch, first_f = ch, f
        elif ch != first_ch and mixed_channels == "error":
            raise DataFileError(f"cannot write {os.fspath(path)!r}: image file {str(f)!r} has {ch} channel(s) but {str(first_f)!r} has {first_ch}: "
                                "images of mixed channel counts; pass mixed_channels='convert' to store all as RGB")

    def load(i: int) -> tuple[Any, int]:
        f, c = samples[i]
        try:
            with Image.open(f) as im:
                im.load()
                return (im if im.mode in ("RGB", "L") else im.convert("RGB")), c
        except (OSError, UnidentifiedImageError) as e:
            raise DataFileError(f"image file {str(f)!r} cannot be decoded: {e}") from None

    return _write(path, len(samples), load, lambda i: f"image file {str(samples[i][0])!r}",
                  write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                  num_classes=len(classes), mixed_channels="convert", num_workers=num_workers, progress=progress,
                  desc=f"writing {Path(os.fspath(path)).name}", page_size=page_size, classes=tuple(classes))


def write_fashion_mnist(
    split: str,
    path: str | os.PathLike[str],
    *,
    indices: Sequence[int] | None = None,
    image_size: int | None = None,
    root: str | os.PathLike[str] | None = None,
    write_mode: str = "raw",
    jpeg_quality: int = 90,
    num_workers: int | None = None,
    progress: bool = True,
) -> BetonInfo:
    """Write Fashion-MNIST (from the local idx files) to an FFCV ``.beton`` file, grey stored as RGB.

    Args:
        split: ``"train"`` or ``"test"``.
        path: output file.
        indices: positions in the split to write, in this order (default: all).
        image_size: if given, upscale each 28x28 image to ``image_size`` (PIL bilinear) at write time, e.g. to
            store images at the model's input size so that the loader does no resizing.
        root: directory of the idx files (see :func:`iis_fast.data.load_fashion_mnist`).
        write_mode, jpeg_quality, num_workers, progress: as in :func:`write_arrays`.
    """
    from PIL import Image

    from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist(split, root)
    idx = np.arange(images.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= images.shape[0])):
        raise IISInputError(f"indices must be 1-D positions in 0..{images.shape[0] - 1}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise IISInputError(f"image_size must be a positive int or None, got {image_size!r}")

    def load(i: int) -> tuple[Any, int]:
        a = images[idx[i]]
        if image_size is not None and image_size != 28:
            a = np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.BILINEAR))
        return a, int(labels[idx[i]])

    info = _write(path, len(idx), load, lambda i: f"Fashion-MNIST {split} image {int(idx[i])}",
                  write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality, num_classes=10,
                  mixed_channels="error", num_workers=num_workers, progress=progress,
                  desc=f"writing {Path(os.fspath(path)).name}", page_size=1 << 21)
    return dataclasses.replace(info, classes=tuple(FASHION_MNIST_CLASSES))
