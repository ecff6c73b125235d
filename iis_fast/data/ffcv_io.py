"""FFCV ``.beton`` files: writers (image folder, torch dataset, numpy arrays, Fashion-MNIST) and a validator.

Every file written here has two fields, ``image`` (an FFCV ``RGBImageField``: 3-channel uint8, stored raw or as
JPEG) and ``label`` (an ``IntField``), in that order.

Writing is atomic: samples go to ``<path>.tmp-XXXXXX`` in the same directory, which is renamed onto ``path``
(``os.replace``) only after the header and the allocation table are complete. A write that raises removes its
temporary file; a write that is killed (SIGKILL, power loss) leaves at most a ``*.tmp-*`` file, never a file at
``path``.

We do not use ``ffcv.writer.DatasetWriter.from_indexed_dataset``: its worker processes swallow exceptions and the
parent then waits forever for the missing samples. Instead, threads load/convert/encode samples (PIL, OpenCV and
the JPEG encoder release the GIL) and the calling thread lays them out with FFCV's own ``MemoryAllocator`` and
header/metadata/allocation-table code, so the file format is FFCV's, byte for byte.

:func:`validate_beton` checks a file before any decoding or numba compilation: existence, header, field
descriptors, metadata and allocation table against the file size (truncation), every image's storage record,
and the label field (present, non-negative, below ``num_classes``). It raises :class:`DataFileError` naming the
file and the problem.

Checksum: every file written here carries the SHA-256 of its bytes in the label field's descriptor (the 1,024
argument bytes FFCV reserves for a field and ignores for an ``IntField``), so it travels with the file and FFCV
still reads it unchanged. :func:`validate_beton` verifies it once per process per file (again when the file's
inode, size or timestamps change), which catches corruption inside the data region that no structural check can
see. Files written by other tools carry no checksum and are checked structurally only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, DataFileError, IISInputError

__all__ = [
    "BetonInfo",
    "IMAGE_FIELD",
    "LABEL_FIELD",
    "IMAGE_EXTENSIONS",
    "validate_beton",
    "write_arrays",
    "write_dataset",
    "write_fashion_mnist",
    "write_image_folder",
]

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MODES = {"raw": 1, "jpg": 0}
_MIN_PAGE = 1 << 21
_MAX_FIELDS = 64
#: Marks a checksum in a label field descriptor's argument bytes; the 32-byte SHA-256 digest follows it.
_CHECKSUM_MAGIC = b"iis_fast-sha256\0"
_CHECKSUM_LEN = len(_CHECKSUM_MAGIC) + 32
#: resolved path -> (inode, size, mtime, ctime) of files whose checksum this process verified or wrote.
_VERIFIED: dict[str, tuple[int, int, int, int]] = {}


def _ffcv() -> Any:
    try:
        import ffcv  # noqa: F401
        import ffcv.types
        import ffcv.writer
        return ffcv
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise BackendUnavailable(
            f"FFCV is not importable ({e}); install it with `apt-get install libturbojpeg0-dev libopencv-dev` "
            "then `pip install ffcv` (it also needs Pillow, opencv-python and numba)"
        ) from e


# --------------------------------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class BetonInfo:
    """What :func:`validate_beton` learnt about a file.

    Attributes:
        path: the file (absolute).
        num_samples: number of samples.
        image_field, label_field: names of the image and label fields.
        num_classes: ``max(label) + 1`` (or the ``num_classes`` the caller passed, if larger).
        max_height, max_width: the largest stored image sides.
        n_jpeg, n_raw: how many images are stored as JPEG / raw pixels.
        size, mtime_ns: the file's size and modification time when validated.
        classes: class names, when known (folder writers; not stored in the file).
        checksum: the SHA-256 (hex) the file carries, None for files written by other tools.
    """

    path: str
    num_samples: int
    image_field: str
    label_field: str
    num_classes: int
    max_height: int
    max_width: int
    n_jpeg: int
    n_raw: int
    size: int
    mtime_ns: int
    classes: tuple[str, ...] | None = None
    checksum: str | None = None


def _fail(path: Any, problem: str) -> DataFileError:
    return DataFileError(f"FFCV file {os.fspath(path)!r}: {problem}")


def validate_beton(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    image_field: str | None = None,
    label_field: str | None = None,
    check_jpeg: bool = True,
    verify_checksum: str = "once",
) -> BetonInfo:
    """Check an FFCV ``.beton`` file for use as ``(image, label)`` data, without decoding any image.

    Cost: reads the header, the per-sample metadata and the allocation table (a few bytes per sample), plus two
    bytes per JPEG sample when ``check_jpeg``; no numba compilation. For a file carrying a checksum (written by
    iis_fast), the first validation in a process also hashes the whole file (about 1.4 GB/s).

    Args:
        path: the file.
        num_classes: if given, every label must be in ``0..num_classes-1``; labels must be ``>= 0`` regardless.
        image_field: name of the image field (default: the only ``RGBImageField``).
        label_field: name of the label field (default: ``"label"``, else the only ``IntField``).
        check_jpeg: check that each JPEG-stored image starts with the JPEG SOI marker (catches overwritten data).
        verify_checksum: ``"once"`` (default: once per process per file, again if the file changes on disk),
            ``"always"`` or ``"never"``: when to compare the file's bytes with the checksum it carries.

    Returns:
        A :class:`BetonInfo`.

    Raises:
        DataFileError: missing file, not a file, truncated or corrupt header/metadata/allocation table, a storage
            record that points outside the data, no image or label field, labels out of range, no samples, bytes
            that do not match the file's checksum.
    """
    if verify_checksum not in ("once", "always", "never"):
        raise IISInputError(f"verify_checksum={verify_checksum!r}: choose 'once', 'always' or 'never'")
    ffcv = _ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise _fail(p, "no such file")
    if not p.is_file():
        raise _fail(p, "is not a regular file")
    st = p.stat()
    size = st.st_size
    if size < HeaderType.itemsize:
        raise _fail(p, f"truncated: {size} bytes, smaller than the {HeaderType.itemsize}-byte FFCV header")
    with open(p, "rb") as f:
        head = f.read(HeaderType.itemsize + _MAX_FIELDS * FieldDescType.itemsize)
    header = np.frombuffer(head[:HeaderType.itemsize], dtype=HeaderType)[0]
    version, n_fields = int(header["version"]), int(header["num_fields"])
    page_size, n, table_ptr = int(header["page_size"]), int(header["num_samples"]), int(header["alloc_table_ptr"])
    if version != CURRENT_VERSION:
        raise _fail(p, f"not an FFCV .beton file of format version {CURRENT_VERSION} (header says version {version}); "
                       "corrupt, or not a .beton file")
    if not 1 <= n_fields <= _MAX_FIELDS:
        raise _fail(p, f"corrupt header: {n_fields} fields")
    if page_size < _MIN_PAGE or page_size & (page_size - 1):
        raise _fail(p, f"corrupt header: page size {page_size} is not a power of two >= {_MIN_PAGE}")
    if table_ptr == 0:
        raise _fail(p, "incomplete: the header has no allocation table (the write did not finish)")
    fields_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
    if size < fields_end:
        raise _fail(p, f"truncated: {size} bytes, the header and {n_fields} field descriptors need {fields_end}")
    desc = np.frombuffer(head[HeaderType.itemsize:fields_end], dtype=FieldDescType)
    handlers: dict[str, Any] = {}
    for d in desc:
        tid = int(d["type_id"])
        try:
            name = d["name"].tobytes().decode("ascii").split("\x00")[0]
        except UnicodeDecodeError:
            raise _fail(p, "corrupt field descriptor (field name is not ASCII)") from None
        if tid not in TYPE_ID_HANDLER:
            raise _fail(p, f"corrupt field descriptor: field {name!r} has unknown type id {tid}")
        if TYPE_ID_HANDLER[tid] is None:
            raise _fail(p, f"field {name!r} is a custom FFCV field; only standard fields are supported")
        if not name or name in handlers:
            raise _fail(p, f"corrupt field descriptors: empty or repeated field name {name!r}")
        handlers[name] = TYPE_ID_HANDLER[tid].from_binary(d["arguments"])
    names = list(handlers)
    meta_type = np.dtype([(k, h.metadata_type) for k, h in handlers.items()], align=True)
    meta_end = fields_end + n * meta_type.itemsize
    if n == 0:
        raise _fail(p, "holds no samples")
    if table_ptr < meta_end or table_ptr > size:
        what = "truncated" if table_ptr > size else "corrupt header"
        raise _fail(p, f"{what}: the allocation table should start at byte {table_ptr}, but the metadata of "
                       f"{n} samples ends at {meta_end} and the file has {size} bytes")
    if (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise _fail(p, f"truncated or corrupt: the allocation table ({size - table_ptr} bytes from byte {table_ptr} "
                       f"to the end) is not a whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries")

    # -- fields
    img_names = [k for k, h in handlers.items() if isinstance(h, RGBImageField)]
    if image_field is None:
        if len(img_names) != 1:
            raise _fail(p, f"needs exactly one RGB image field, found {img_names or 'none'} among fields {names}; "
                           "pass image_field=")
        image_field = img_names[0]
    elif image_field not in img_names:
        raise _fail(p, f"has no RGB image field {image_field!r} (fields: {names})")
    int_names = [k for k, h in handlers.items() if isinstance(h, IntField)]
    if label_field is None:
        label_field = LABEL_FIELD if LABEL_FIELD in int_names else (int_names[0] if len(int_names) == 1 else None)
        if label_field is None:
            raise _fail(p, f"has no integer label field (fields: {names}); write one named 'label' "
                           "(ffcv.fields.IntField) or pass label_field=")
    elif label_field not in int_names:
        raise _fail(p, f"has no integer label field {label_field!r} (fields: {names})")

    # -- metadata and allocation table
    meta = np.fromfile(p, dtype=meta_type, count=n, offset=fields_end)
    table = np.fromfile(p, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    data_start = meta_end
    if table.size:
        bad = (table["ptr"] < data_start) | (table["ptr"] + table["size"] > table_ptr) | (table["sample_id"] >= n)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _fail(p, f"corrupt allocation table: entry {i} (sample {int(table['sample_id'][i])}, "
                           f"bytes {int(table['ptr'][i])}..{int(table['ptr'][i] + table['size'][i])}) lies outside "
                           f"the data region {data_start}..{table_ptr}")
    img = meta[image_field]
    modes, h, w, ptr = img["mode"], img["height"].astype(np.int64), img["width"].astype(np.int64), img["data_ptr"]
    bad = ~np.isin(modes, list(_MODES.values())) | (h == 0) | (w == 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(p, f"corrupt metadata: sample {i} has storage mode {int(modes[i])} and size "
                       f"{int(h[i])}x{int(w[i])}")
    order = np.argsort(table["ptr"], kind="stable")
    sorted_ptr = table["ptr"][order]
    pos = np.searchsorted(sorted_ptr, ptr)
    found = pos < sorted_ptr.size
    found[found] = sorted_ptr[pos[found]] == ptr[found]
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise _fail(p, f"corrupt or truncated: the image of sample {i} points at byte {int(ptr[i])}, which is not "
                       f"an allocated record ({table.size} records in the allocation table)")
    stored = table["size"][order][pos].astype(np.int64)
    raw = modes == _MODES["raw"]
    bad = raw & (stored != h * w * 3)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(p, f"corrupt data: raw image of sample {i} is {int(h[i])}x{int(w[i])}x3 but its record holds "
                       f"{int(stored[i])} bytes")
    jpg = ~raw
    if check_jpeg and jpg.any():
        mm = np.memmap(p, dtype=np.uint8, mode="r", shape=(table_ptr,))
        jp = ptr[jpg].astype(np.int64)
        ok = (stored[jpg] > 4) & (mm[jp] == 0xFF) & (mm[jp + 1] == 0xD8)
        del mm
        if not ok.all():
            i = int(np.flatnonzero(jpg)[np.flatnonzero(~ok)[0]])
            raise _fail(p, f"corrupt data: JPEG image of sample {i} (byte {int(ptr[i])}) does not start with a "
                           "JPEG marker")

    label_index = names.index(label_field)
    args_at = HeaderType.itemsize + label_index * FieldDescType.itemsize + FieldDescType.fields["arguments"][1]
    stored_sum = _stored_checksum(head, args_at) if isinstance(handlers[label_field], IntField) else None

    labels = meta[label_field]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        i = int(np.argmin(labels))
        raise _fail(p, f"label field {label_field!r} holds a negative label {lo} (sample {i}); labels must be "
                       "class indices 0..K-1")
    if num_classes is not None and hi >= num_classes:
        i = int(np.argmax(labels))
        raise _fail(p, f"label field {label_field!r} holds label {hi} (sample {i}), out of range for "
                       f"num_classes={num_classes} (labels must be 0..{num_classes - 1})")
    from ..validation import MAX_CLASSES
    if hi >= MAX_CLASSES:
        i = int(np.argmax(labels))
        raise _fail(p, f"label field {label_field!r} holds label {hi} (sample {i}), above the largest supported "
                       f"class index {MAX_CLASSES - 1}")
    if stored_sum is not None and verify_checksum != "never":
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = str(p.resolve())
        if verify_checksum == "always" or _VERIFIED.get(key) != sig:
            if _file_checksum(p, args_at) != stored_sum:
                _VERIFIED.pop(key, None)
                raise _fail(p, "corrupt data: the file's bytes do not match the SHA-256 stored in it when it was "
                               "written (changed or damaged on disk since); write the file again")
            _VERIFIED[key] = sig
    return BetonInfo(
        path=str(p.resolve()), num_samples=n, image_field=image_field, label_field=label_field,
        num_classes=max(hi + 1, num_classes or 0), max_height=int(h.max()), max_width=int(w.max()),
        n_jpeg=int(jpg.sum()), n_raw=int(raw.sum()), size=size, mtime_ns=st.st_mtime_ns, checksum=stored_sum,
    )


def _stored_checksum(head: bytes, args_at: int) -> str | None:
    """The hex digest stored at ``args_at`` (a label field's argument bytes), or None when none is stored."""
    region = head[args_at:args_at + _CHECKSUM_LEN]
    if not region.startswith(_CHECKSUM_MAGIC):
        return None
    return region[len(_CHECKSUM_MAGIC):].hex()


def _file_checksum(path: Path, args_at: int) -> str:
    """SHA-256 of the file with its 32 digest bytes read as zeros (how the digest was computed when written)."""
    h = hashlib.sha256()
    digest_at = args_at + len(_CHECKSUM_MAGIC)
    with open(path, "rb") as f:
        first = bytearray(f.read(max(1 << 20, digest_at + 32)))
        first[digest_at:digest_at + 32] = bytes(32)
        h.update(first)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_checksum(path: Path, label_index: int) -> None:
    """Store the file's SHA-256 (magic + digest) in its label field's argument bytes, which are zero until now."""
    from ffcv.types import FieldDescType, HeaderType
    args_at = HeaderType.itemsize + label_index * FieldDescType.itemsize + FieldDescType.fields["arguments"][1]
    with open(path, "r+b") as f:
        f.seek(args_at)
        f.write(_CHECKSUM_MAGIC)
        f.flush()
        digest = bytes.fromhex(_file_checksum(path, args_at))
        f.seek(args_at + len(_CHECKSUM_MAGIC))
        f.write(digest)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------ writing


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
    if not ok and isinstance(label, (np.ndarray, torch_tensor_type())) and getattr(label, "ndim", 1) == 0:
        ok = np.issubdtype(np.asarray(label).dtype, np.integer)
    if not ok:
        raise DataFileError(f"cannot write {os.fspath(out)!r}: {where} has label {label!r}, not an integer class index")
    from ..validation import MAX_CLASSES
    lab = int(label)
    if lab < 0 or lab >= MAX_CLASSES or (num_classes is not None and lab >= num_classes):
        rng = f"0..{min(num_classes, MAX_CLASSES) - 1}" if num_classes is not None else f"0..{MAX_CLASSES - 1}"
        raise DataFileError(f"cannot write {os.fspath(out)!r}: {where} has label {lab}, out of range (labels must "
                            f"be {rng})")
    return lab


def torch_tensor_type() -> type:
    try:
        import torch
        return torch.Tensor
    except ImportError:  # pragma: no cover
        return np.ndarray


def _check_mode(write_mode: str, jpeg_quality: int, max_resolution: int | None) -> str:
    mode = {"jpeg": "jpg"}.get(write_mode, write_mode)
    if mode not in _MODES:
        raise IISInputError(f"write_mode must be 'raw' or 'jpeg', got {write_mode!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise IISInputError(f"jpeg_quality must be in 1..100, got {jpeg_quality!r}")
    if max_resolution is not None and (isinstance(max_resolution, bool) or int(max_resolution) < 1):
        raise IISInputError(f"max_resolution must be a positive int or None, got {max_resolution!r}")
    return mode


def _default_workers(num_workers: int | None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
    _ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import encode_jpeg, resizer
    from ffcv.memory_allocator import MemoryAllocator
    from tqdm.auto import tqdm

    mode = _check_mode(write_mode, jpeg_quality, max_resolution)
    if mixed_channels not in ("error", "convert"):
        raise IISInputError(f"mixed_channels must be 'error' or 'convert', got {mixed_channels!r}")
    if n < 1:
        raise IISInputError(f"nothing to write to {os.fspath(path)!r}: the data holds no samples")
    if page_size < _MIN_PAGE or page_size & (page_size - 1):
        raise IISInputError(f"page_size must be a power of two >= {_MIN_PAGE}, got {page_size}")
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
        return _MODES[mode], a.shape[0], a.shape[1], data, lab

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
    _VERIFIED[str(final)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)   # hashed just now
    info = validate_beton(final, num_classes=num_classes)
    return dataclasses.replace(info, classes=classes)


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
    from ..validation import MAX_CLASSES
    top = MAX_CLASSES if num_classes is None else min(num_classes, MAX_CLASSES)
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
                t.min() < 0 or (num_classes is not None and t.max() >= num_classes)):
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
