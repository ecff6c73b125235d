"""Configuration of one IIS measurement. Every default is the one docs/spec.md §1 gives."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import IISInputError

DEFAULT_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
DEFAULT_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
LIBRARIES = ("prototype", "cluster", "end2end", "text")
BACKENDS = ("auto", "cpp", "triton", "torch", "reference")
#: Fields that hold whole numbers: 2.5 epochs is refused, 30.0 is read as 30.
INT_FIELDS: tuple[str, ...] = ("num_concepts", "epochs", "batch_size", "seed", "images_per_class", "max_elements",
                               "extract_batch_size")


def whole_number(name: str, value: Any) -> int:
    """``value`` as an int, or IISInputError naming ``name`` when it is not a whole number (bools refused too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise IISInputError(f"{name}={value!r}: must be a whole number")
    return int(value)


REPRODUCE = (None, "official")
#: The options the ``reproduce`` preset sets (docs/spec.md §1.9), their choices, defaults and official values.
PRESET_CHOICES: dict[str, tuple[str, ...]] = {
    "elements": ("patches", "segments", "both"), "element_geometry": ("crop", "official"),
    "prototype_selection": ("stratified", "first"), "element_subset": ("random", "first"),
    "end2end_eval": ("argmax", "stochastic")}
DEFAULT_OPTIONS: dict[str, str] = {"elements": "both", "element_geometry": "crop", "prototype_selection": "stratified",
                                   "element_subset": "random", "end2end_eval": "argmax"}
OFFICIAL_OPTIONS: dict[str, str] = {"elements": "segments", "element_geometry": "official",
                                    "prototype_selection": "first", "element_subset": "first",
                                    "end2end_eval": "stochastic"}


@dataclass
class IISConfig:
    """All knobs of one IIS run (docs/spec.md §1). Build with ``IISConfig(**options)``; unknown options raise."""

    library: str = "prototype"          # prototype | cluster | end2end | text
    num_concepts: int = 200             # M
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    lrs: Sequence[float] = DEFAULT_LRS
    epochs: int = 30
    batch_size: int = 1024
    lr_decay: float = 0.99              # lr multiplied by this after every epoch
    seed: int = 0
    images_per_class: int = 10          # concept-source images per class (TRAIN split only)
    reproduce: str | None = None        # "official": every option left None below takes its official value
    elements: str | None = None         # patches | segments | both (None: "both"; official "segments")
    element_geometry: str | None = None     # crop | official (None: "crop"; docs/spec.md §1.2)
    prototype_selection: str | None = None  # stratified | first (None: "stratified"; official "first")
    max_elements: int = 20000           # cap for cluster / end2end
    element_subset: str | None = None   # random | first: which max_elements (None: "random"; official "first")
    end2end_eval: str | None = None     # argmax | stochastic (None: "argmax"; official "stochastic")
    selection: str = "eval"             # epoch selection split: "eval" (reference) | "holdout"
    selection_fraction: float = 0.1     # share of train held out when selection == "holdout"
    eval_fraction: float = 0.2          # share of the loader held out when no eval_loader is given
    device: str = "cpu"
    dtype: str = "float32"              # storage dtype of features (compute is fp32)
    backend: str = "auto"
    cache_dir: str | None = None        # None: ~/.cache/iis_fast (or $IIS_FAST_CACHE)
    progress: bool = True
    extract_batch_size: int = 64
    extract_dtype: str = "auto"         # backbone compute dtype: auto | float32 | bfloat16 | float16 (resolved per device)
    channels_last: bool = True          # run the backbone in channels-last memory format (same fp32 math)
    compile: bool = False               # torch.compile the backbone's forward for extraction

    def __post_init__(self) -> None:
        self.sparsities = tuple(float(s) for s in self.sparsities)
        self.lrs = tuple(float(v) for v in self.lrs)
        self._resolve_preset()
        for name in INT_FIELDS:
            setattr(self, name, whole_number(name, getattr(self, name)))
        try:
            torch.device(self.device)           # the name only: whether it exists is checked where work runs
        except (RuntimeError, TypeError, ValueError):
            raise IISInputError(f"device={self.device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', "
                                "'mps', ...") from None
        if self.extract_dtype == "auto":
            from .features import resolve_extract_dtype
            self.extract_dtype = resolve_extract_dtype("auto", self.device)
        self.validate()

    def _resolve_preset(self) -> None:
        """Options left None take the value of the ``reproduce`` preset (docs/spec.md §1.9)."""
        if self.reproduce not in REPRODUCE:
            raise IISInputError(f"reproduce={self.reproduce!r}: choose None or 'official'")
        preset = OFFICIAL_OPTIONS if self.reproduce == "official" else DEFAULT_OPTIONS
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not isinstance(self.elements, str):          # a sequence of kinds, as earlier versions took
            kinds = tuple(self.elements)
            self.elements = "both" if sorted(kinds) == ["patches", "segments"] else (kinds[0] if len(kinds) == 1
                                                                                     else repr(kinds))

    def validate(self) -> None:
        if self.library not in LIBRARIES:
            raise IISInputError(f"library={self.library!r}: choose one of {LIBRARIES}")
        if self.backend not in BACKENDS:
            raise IISInputError(f"backend={self.backend!r}: choose one of {BACKENDS}")
        if not self.sparsities:
            raise IISInputError("sparsities is empty: give at least one sparsity in [0, 1)")
        for s in self.sparsities:
            if not (0.0 <= s < 1.0):
                raise IISInputError(f"sparsity {s} is outside [0, 1): every sparsity s must satisfy 0 <= s < 1")
        if len(set(self.sparsities)) != len(self.sparsities):
            raise IISInputError(f"sparsities {self.sparsities} contain duplicates")
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise IISInputError(f"lrs={self.lrs}: give at least one learning rate, each positive and finite")
        if isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, numbers.Real) \
                or not 0.0 < self.lr_decay <= 1.0:
            raise IISInputError(f"lr_decay={self.lr_decay!r}: must be in (0, 1] (the learning rate is multiplied by "
                                "it after every epoch; 1 keeps it constant)")
        for name in INT_FIELDS:
            whole_number(name, getattr(self, name))
        if self.seed < 0:
            raise IISInputError(f"seed={self.seed}: must be >= 0 (numpy seeds are non-negative)")
        if self.num_concepts < 2:
            raise IISInputError(f"num_concepts={self.num_concepts}: need at least 2 concepts")
        for name in ("epochs", "batch_size", "images_per_class", "extract_batch_size"):
            if int(getattr(self, name)) < 1:
                raise IISInputError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.selection not in ("eval", "holdout"):
            raise IISInputError(f"selection={self.selection!r}: choose 'eval' or 'holdout'")
        for name, choices in PRESET_CHOICES.items():
            if getattr(self, name) not in choices:
                raise IISInputError(f"{name}={getattr(self, name)!r}: choose one of {choices}")
        if self.extract_dtype not in ("float32", "float16", "bfloat16"):
            raise IISInputError(f"extract_dtype={self.extract_dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise IISInputError(f"dtype={self.dtype!r}: choose float32, float16 or bfloat16")
        for frac in ("selection_fraction", "eval_fraction"):
            if not (0.0 < getattr(self, frac) < 1.0):
                raise IISInputError(f"{frac}={getattr(self, frac)}: must be in (0, 1)")

    @classmethod
    def from_options(cls, **options: Any) -> "IISConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise IISInputError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def kept_count(num_concepts: int, sparsity: float) -> int:
    """Entries a head at sparsity s keeps per row when |values| are distinct: M - (int(M*s) + 1)."""
    return num_concepts - (int(num_concepts * sparsity) + 1)


def threshold_rank(num_concepts: int, sparsity: float) -> int:
    """k = int(M*s): entries whose |value| is strictly above the (k+1)-th smallest are kept (docs/spec.md §1.3)."""
    k = int(num_concepts * sparsity)
    if k >= num_concepts:
        raise IISInputError(f"sparsity {sparsity} keeps no entry of {num_concepts} concepts")
    return k
