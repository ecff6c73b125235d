"""Which checkpoints a sweep scores: paths, globs, folders, and text/CSV lists of ``model_name,path``.

Every checkpoint becomes a :class:`CheckpointSpec` with its timm model name, absolute path, training step (from a
``step`` column or the file name) and any extra list columns as metadata.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import IISInputError

__all__ = ["CheckpointSpec", "CHECKPOINT_SUFFIXES", "LIST_SUFFIXES", "parse_checkpoints", "step_from_name"]

#: Files a folder or glob contributes (other files in a folder are ignored).
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
#: Files read as lists of checkpoints rather than as checkpoints.
LIST_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".lst", ".list")

_STEP_RE = re.compile(r"(?:step|iter|it|global_step|checkpoint|ckpt|epoch|ep)[_\-=]?(\d+)", re.IGNORECASE)
_NUM_RE = re.compile(r"(\d+)")


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint to score.

    Attributes:
        model: timm model name (``iis_fast.models.create_model`` builds it).
        path: absolute path of the weight file.
        step: training step (``None`` when unknown): the list's ``step`` column, else a number in the file name.
        meta: the list's other columns (e.g. ``epoch``, ``test_acc``), as strings.
    """

    model: str
    path: str
    step: int | None = None
    meta: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """Identity in the results store: ``model@path``."""
        return f"{self.model}@{self.path}"


def step_from_name(path: str | os.PathLike[str]) -> int | None:
    """The training step encoded in a file name (``step_001200.pt`` -> 1200, ``ckpt-7.pth`` -> 7, ``12.pt`` -> 12)."""
    stem = Path(path).name
    for suf in CHECKPOINT_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
    m = _STEP_RE.findall(stem)
    if m:
        return int(m[-1])
    nums = _NUM_RE.findall(stem)
    return int(nums[-1]) if nums else None


def _is_list_file(p: Path) -> bool:
    return p.suffix.lower() in LIST_SUFFIXES


#: Column separators of checkpoint lists, in order of preference.
LIST_DELIMITERS: tuple[str, ...] = (",", ";", "\t")


def _delimiter(first_line: str) -> str:
    """The separator of a checkpoint list: the first of :data:`LIST_DELIMITERS` its first row uses (else ",")."""
    for d in LIST_DELIMITERS:
        if d in first_line:
            return d
    return ","


def _read_list(p: Path, arch: str | None) -> list[CheckpointSpec]:
    """Rows ``model_name,path[,more]`` (a header naming ``path`` is optional; ``;`` or tab instead of ``,`` when the
    first row uses it); relative paths are from the list's folder."""
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    delim = _delimiter(lines[0])
    first = [c.strip().lower() for c in next(csv.reader([lines[0]], delimiter=delim))]
    out: list[CheckpointSpec] = []
    if "path" in first:
        rows: Iterable[dict[str, str]] = csv.DictReader(lines, delimiter=delim)
    else:
        def plain() -> Iterable[dict[str, str]]:
            for cells in csv.reader(lines, delimiter=delim):
                cells = [c.strip() for c in cells]
                if len(cells) == 1:
                    yield {"path": cells[0]}
                else:
                    yield {"model_name": cells[0], "path": cells[1],
                           **{f"col{i}": c for i, c in enumerate(cells[2:], start=2)}}
        rows = plain()
    for lineno, row in enumerate(rows, start=2 if "path" in first else 1):
        extra = row.pop(None, None)                       # cells beyond the header's columns
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        raw = row.pop("path", "")
        if not raw:
            raise IISInputError(f"{p}: row {lineno} has no path")
        if extra or any(d in raw for d in LIST_DELIMITERS if d != delim):
            raise IISInputError(f"{p}: row {lineno} does not split into the first row's columns with the separator "
                                f"{delim!r} (path {raw!r}{f', extra cells {extra}' if extra else ''}): use one "
                                "separator throughout the list")
        step_txt = row.pop("step", "")
        try:
            step = int(float(step_txt)) if step_txt else None
        except (ValueError, OverflowError):
            raise IISInputError(f"{p}: row {lineno} has step {step_txt!r}, not a number") from None
        model = row.pop("model_name", "") or row.pop("model", "") or arch
        if not model:
            raise IISInputError(f"{p}: row {lineno} ({raw}) names no model; add a model_name column or pass arch=")
        path = Path(raw)
        if not path.is_absolute():
            path = p.parent / path
        step = step if step is not None else step_from_name(path)
        out.append(CheckpointSpec(model, str(path.resolve()), step, row))
    return out


def parse_checkpoints(items: str | os.PathLike[str] | CheckpointSpec | Sequence[Any],
                      arch: str | None = None) -> list[CheckpointSpec]:
    """Expand checkpoint arguments into :class:`CheckpointSpec` s, in a stable order, without duplicates.

    Args:
        items: one or more of: a checkpoint file; a folder (its checkpoint files, sorted by step then name; a
            folder holding ``checkpoints.csv`` uses that list); a glob (``runs/*/step_*.pt``); a ``.csv``/``.txt``
            list of ``model_name,path[,step,...]`` rows or bare paths; a ``(model_name, path)`` pair; a
            :class:`CheckpointSpec`.
        arch: timm model name for every checkpoint that does not name its own.

    Raises:
        IISInputError: nothing matched, a path is missing, or a checkpoint has no model name.
    """
    if isinstance(items, (str, os.PathLike, CheckpointSpec)):
        items = [items]
    specs: list[CheckpointSpec] = []

    def add_file(path: Path) -> None:
        if not arch:
            raise IISInputError(f"checkpoint {path} has no model name: pass arch= (e.g. arch='iis_smallcnn') "
                                "or list it in a CSV of model_name,path")
        specs.append(CheckpointSpec(arch, str(path.resolve()), step_from_name(path)))

    def add_folder(folder: Path) -> None:
        if (folder / "checkpoints.csv").is_file():
            specs.extend(_read_list(folder / "checkpoints.csv", arch))
            return
        files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES]
        if not files:
            raise IISInputError(f"folder {folder} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
        for f in sorted(files, key=lambda f: (step_from_name(f) is None, step_from_name(f) or 0, f.name)):
            add_file(f)

    for item in items:
        if isinstance(item, CheckpointSpec):
            specs.append(item)
            continue
        if isinstance(item, (tuple, list)) and len(item) == 2:
            path = Path(item[1]).resolve()
            specs.append(CheckpointSpec(str(item[0]), str(path), step_from_name(path)))
            continue
        text = os.fspath(item)
        p = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise IISInputError(f"glob {text!r} matched no file")
            for m in sorted(matches, key=lambda m: (step_from_name(m) is None, step_from_name(m) or 0, m)):
                mp = Path(m)
                if mp.is_file() and mp.suffix.lower() in CHECKPOINT_SUFFIXES:
                    add_file(mp)
            continue
        if p.is_dir():
            add_folder(p)
        elif p.is_file() and _is_list_file(p):
            specs.extend(_read_list(p, arch))
        elif p.is_file():
            add_file(p)
        else:
            raise IISInputError(f"checkpoint path {text!r} does not exist")
    seen: set[str] = set()
    unique = []
    for s in specs:
        if s.key not in seen:
            seen.add(s.key)
            unique.append(s)
    if not unique:
        raise IISInputError("no checkpoints given")
    return unique
