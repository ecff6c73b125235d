"""The FFCV ``.beton`` format as iis_fast reads it, and :func:`validate_beton`, which checks a file before any
decoding or numba compilation.

A file holds a header, one descriptor per field, per-sample metadata, the data pages and, at the end, the
allocation table (FFCV's own layout; the files iis_fast writes, see :mod:`iis_fast.data.ffcv_writer`, have two fields,
``image`` (``RGBImageField``) and ``label`` (``IntField``), in that order).

:func:`validate_beton` runs named checks, each raising :class:`DataFileError` naming the file and the problem:
:func:`_check_header` (size, version, field count, page size, finished write), :func:`_read_fields` (field
descriptors), :func:`_check_table_position` (metadata and allocation table against the file size: truncation),
:func:`_pick_fields` (the image and label fields), :func:`_check_allocations` (records inside the data region),
:func:`_check_images` (every image's storage record, JPEG markers), :func:`_check_labels` (non-negative, below
``num_classes`` and :data:`~iis_fast.validation.MAX_CLASSES`) and :func:`_check_checksum`.

Checksum: every file iis_fast writes carries the SHA-256 of its bytes in the label field's descriptor (the 1,024
argument bytes FFCV reserves for a field and ignores for an ``IntField``), so it travels with the file and FFCV
still reads it unchanged. :func:`validate_beton` verifies it once per process per file (again when the file's
inode, size or timestamps change), which catches corruption inside the data region that no structural check can
see. Files written by other tools carry no checksum and are checked structurally only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, DataFileError, IISInputError
from ..validation import MAX_CLASSES, label_bound

__all__ = ["BetonInfo", "IMAGE_FIELD", "LABEL_FIELD", "validate_beton"]

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
#: FFCV's ``RGBImageField`` storage modes.
MODES = {"raw": 1, "jpg": 0}
#: Smallest FFCV page size (pages are powers of two).
MIN_PAGE = 1 << 21
_MAX_FIELDS = 64
#: Marks a checksum in a label field descriptor's argument bytes; the 32-byte SHA-256 digest follows it.
CHECKSUM_MAGIC = b"iis_fast-sha256\0"
_CHECKSUM_LEN = len(CHECKSUM_MAGIC) + 32
#: resolved path -> (inode, size, mtime, ctime) of files whose checksum this process verified or wrote.
VERIFIED: dict[str, tuple[int, int, int, int]] = {}


def ffcv_module() -> Any:
    """``import ffcv`` (about 10 s), or :class:`BackendUnavailable` saying how to install it."""
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


def checksum_offset(label_index: int) -> int:
    """Byte offset of the argument bytes of field ``label_index``'s descriptor (where the checksum lives)."""
    from ffcv.types import FieldDescType, HeaderType
    return HeaderType.itemsize + label_index * FieldDescType.itemsize + FieldDescType.fields["arguments"][1]


@dataclasses.dataclass(frozen=True)
class _Header:
    n_fields: int
    num_samples: int
    table_ptr: int
    head: bytes          # the header and up to _MAX_FIELDS field descriptors, as read


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
    ffcv_module()
    from ffcv.fields import IntField
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise _fail(p, "no such file")
    if not p.is_file():
        raise _fail(p, "is not a regular file")
    st = p.stat()
    hdr = _check_header(p, st.st_size)
    fields_end = HeaderType.itemsize + hdr.n_fields * FieldDescType.itemsize
    handlers = _read_fields(p, hdr.head[HeaderType.itemsize:fields_end])
    meta_type = np.dtype([(k, h.metadata_type) for k, h in handlers.items()], align=True)
    meta_end = fields_end + hdr.num_samples * meta_type.itemsize
    _check_table_position(p, hdr, meta_end, st.st_size)
    image_field, label_field = _pick_fields(p, handlers, image_field, label_field)

    meta = np.fromfile(p, dtype=meta_type, count=hdr.num_samples, offset=fields_end)
    table = np.fromfile(p, dtype=ALLOC_TABLE_TYPE, offset=hdr.table_ptr)
    _check_allocations(p, table, meta_end, hdr)
    h, w, raw = _check_images(p, meta[image_field], table, hdr.table_ptr, check_jpeg)
    hi = _check_labels(p, meta[label_field], label_field, num_classes)

    args_at = checksum_offset(list(handlers).index(label_field))
    stored_sum = _stored_checksum(hdr.head, args_at) if isinstance(handlers[label_field], IntField) else None
    if stored_sum is not None and verify_checksum != "never":
        _check_checksum(p, st, stored_sum, args_at, always=verify_checksum == "always")
    return BetonInfo(
        path=str(p.resolve()), num_samples=hdr.num_samples, image_field=image_field, label_field=label_field,
        num_classes=max(hi + 1, num_classes or 0), max_height=int(h.max()), max_width=int(w.max()),
        n_jpeg=int((~raw).sum()), n_raw=int(raw.sum()), size=st.st_size, mtime_ns=st.st_mtime_ns,
        checksum=stored_sum,
    )


def _check_header(p: Path, size: int) -> _Header:
    """The header: big enough, FFCV's format version, a sane field count and page size, a finished write."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType
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
    if page_size < MIN_PAGE or page_size & (page_size - 1):
        raise _fail(p, f"corrupt header: page size {page_size} is not a power of two >= {MIN_PAGE}")
    if table_ptr == 0:
        raise _fail(p, "incomplete: the header has no allocation table (the write did not finish)")
    fields_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
    if size < fields_end:
        raise _fail(p, f"truncated: {size} bytes, the header and {n_fields} field descriptors need {fields_end}")
    return _Header(n_fields=n_fields, num_samples=n, table_ptr=table_ptr, head=head)


def _read_fields(p: Path, desc_bytes: bytes) -> dict[str, Any]:
    """Field name -> FFCV field handler, from the descriptors: ASCII names, unique, standard field types."""
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType
    handlers: dict[str, Any] = {}
    for d in np.frombuffer(desc_bytes, dtype=FieldDescType):
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
    return handlers


def _check_table_position(p: Path, hdr: _Header, meta_end: int, size: int) -> None:
    """Samples exist; the allocation table starts after the metadata, inside the file, and fills it to the end."""
    from ffcv.types import ALLOC_TABLE_TYPE
    n, table_ptr = hdr.num_samples, hdr.table_ptr
    if n == 0:
        raise _fail(p, "holds no samples")
    if table_ptr < meta_end or table_ptr > size:
        what = "truncated" if table_ptr > size else "corrupt header"
        raise _fail(p, f"{what}: the allocation table should start at byte {table_ptr}, but the metadata of "
                       f"{n} samples ends at {meta_end} and the file has {size} bytes")
    if (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise _fail(p, f"truncated or corrupt: the allocation table ({size - table_ptr} bytes from byte {table_ptr} "
                       f"to the end) is not a whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries")


def _pick_fields(p: Path, handlers: dict[str, Any], image_field: str | None, label_field: str | None
                 ) -> tuple[str, str]:
    """The image field (the only RGB one, or the named one) and the label field ("label", the only int one, or
    the named one)."""
    from ffcv.fields import IntField, RGBImageField
    names = list(handlers)
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
    return image_field, label_field


def _check_allocations(p: Path, table: np.ndarray, data_start: int, hdr: _Header) -> None:
    """Every allocation record lies inside the data region and belongs to an existing sample."""
    if not table.size:
        return
    bad = ((table["ptr"] < data_start) | (table["ptr"] + table["size"] > hdr.table_ptr)
           | (table["sample_id"] >= hdr.num_samples))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(p, f"corrupt allocation table: entry {i} (sample {int(table['sample_id'][i])}, "
                       f"bytes {int(table['ptr'][i])}..{int(table['ptr'][i] + table['size'][i])}) lies outside "
                       f"the data region {data_start}..{hdr.table_ptr}")


def _check_images(p: Path, img: np.ndarray, table: np.ndarray, table_ptr: int, check_jpeg: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image: a known storage mode, a non-empty size, a pointer to an allocated record of the right size
    (raw), starting with the JPEG marker (JPEG, when ``check_jpeg``). Returns (heights, widths, is_raw)."""
    modes, h, w, ptr = img["mode"], img["height"].astype(np.int64), img["width"].astype(np.int64), img["data_ptr"]
    bad = ~np.isin(modes, list(MODES.values())) | (h == 0) | (w == 0)
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
    raw = modes == MODES["raw"]
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
    return h, w, raw


def _check_labels(p: Path, labels: np.ndarray, label_field: str, num_classes: int | None) -> int:
    """Labels are class indices: non-negative, below ``num_classes`` and :data:`MAX_CLASSES`. Returns the largest."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        i = int(np.argmin(labels))
        raise _fail(p, f"label field {label_field!r} holds a negative label {lo} (sample {i}); labels must be "
                       "class indices 0..K-1")
    if hi >= label_bound(num_classes):
        i = int(np.argmax(labels))
        if num_classes is not None and hi >= num_classes:
            raise _fail(p, f"label field {label_field!r} holds label {hi} (sample {i}), out of range for "
                           f"num_classes={num_classes} (labels must be 0..{num_classes - 1})")
        raise _fail(p, f"label field {label_field!r} holds label {hi} (sample {i}), above the largest supported "
                       f"class index {MAX_CLASSES - 1}")
    return hi


def _check_checksum(p: Path, st: os.stat_result, stored_sum: str, args_at: int, *, always: bool) -> None:
    """The file's bytes hash to the SHA-256 it carries (once per process per file state unless ``always``)."""
    sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    key = str(p.resolve())
    if always or VERIFIED.get(key) != sig:
        if file_checksum(p, args_at) != stored_sum:
            VERIFIED.pop(key, None)
            raise _fail(p, "corrupt data: the file's bytes do not match the SHA-256 stored in it when it was "
                           "written (changed or damaged on disk since); write the file again")
        VERIFIED[key] = sig


def _stored_checksum(head: bytes, args_at: int) -> str | None:
    """The hex digest stored at ``args_at`` (a label field's argument bytes), or None when none is stored."""
    region = head[args_at:args_at + _CHECKSUM_LEN]
    if not region.startswith(CHECKSUM_MAGIC):
        return None
    return region[len(CHECKSUM_MAGIC):].hex()


def file_checksum(path: Path, args_at: int) -> str:
    """SHA-256 of the file with its 32 digest bytes read as zeros (how the digest was computed when written)."""
    h = hashlib.sha256()
    digest_at = args_at + len(CHECKSUM_MAGIC)
    with open(path, "rb") as f:
        first = bytearray(f.read(max(1 << 20, digest_at + 32)))
        first[digest_at:digest_at + 32] = bytes(32)
        h.update(first)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
