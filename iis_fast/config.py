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
                               "extract_batch_size", "element_batch_size", "repeats", "bootstrap")


def whole_number(name: str, value: Any) -> int:
    """``value`` as an int, or IISInputError naming ``name`` when it is not a whole number (bools refused too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise IISInputError(f"{name}={value!r}: must be a whole number")
    return int(value)


#: A sweep embeds with larger batches than score()'s default: results do not change, and 64 wastes CPU on small nets.
SWEEP_EXTRACT_BATCH_SIZE = 256

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


DTYPES = ("float32", "bfloat16", "float16")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, cli: bool = True) -> Any:
    """A config field with its help text: the one place an option's default, choices and meaning are written.
    ``iis_fast.cli`` builds the command-line options of every scoring command from these fields."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "cli": cli})


@dataclass
class IISConfig:
    """All knobs of one IIS run (docs/spec.md §1). Build with ``IISConfig(**options)``; unknown options raise."""

    library: str = option("prototype", "concept library type: prototype (an even per-class pick of concept "
                          "elements), cluster, end2end or text", choices=LIBRARIES)
    num_concepts: int = option(200, "M, the number of concepts")
    sparsities: Sequence[float] = option(DEFAULT_SPARSITIES, "comma-separated sparsity grid, each in [0, 1)")
    lrs: Sequence[float] = option(DEFAULT_LRS, "comma-separated learning rates of the grid")
    epochs: int = option(30, "epochs per head")
    batch_size: int = option(1024, "head training batch size")
    lr_decay: float = option(0.99, "the learning rate is multiplied by this after every epoch")
    seed: int = option(0, "seed of concept selection, head initialisation and batch order")
    images_per_class: int = option(10, "concept-source images per class (TRAIN split only)")
    reproduce: str | None = option(None, "'official': every option left unset below takes the official code's "
                                   "value (docs/spec.md §1.9)", choices=REPRODUCE, cli=False)
    elements: str | None = option(None, "concept element kinds (unset: both; official: segments)",
                                  choices=PRESET_CHOICES["elements"])
    element_geometry: str | None = option(None, "element geometry (unset: crop; official: official; docs/spec.md "
                                          "§1.2)", choices=PRESET_CHOICES["element_geometry"])
    prototype_selection: str | None = option(None, "which elements become prototypes (unset: stratified; official: "
                                             "first)", choices=PRESET_CHOICES["prototype_selection"])
    max_elements: int = option(20000, "element cap for the cluster and end2end libraries")
    element_subset: str | None = option(None, "which max_elements are kept (unset: random; official: first)",
                                        choices=PRESET_CHOICES["element_subset"])
    end2end_eval: str | None = option(None, "end2end evaluation (unset: argmax; official: stochastic)",
                                      choices=PRESET_CHOICES["end2end_eval"])
    selection: str = option("eval", "split the best epoch and lr are picked on: eval (as the official code) or "
                            "holdout (a part of TRAIN)", choices=("eval", "holdout"))
    selection_fraction: float = option(0.1, "share of TRAIN held out when selection is holdout")
    repeats: int = option(1, "independent grids (own head initialisation and batch order; same features and "
                          "concepts) trained in one pass: IIS is their mean, with its standard deviation and a "
                          "confidence interval (docs/spec.md §1.10)")
    bootstrap: int = option(1000, "resamples of the evaluation-sample bootstrap interval of IIS (0: none; no "
                            "retraining)")
    confidence: float = option(0.95, "level of the seed and bootstrap intervals")
    selection_check: bool = option(False, "also train the grid(s) on TRAIN minus a held-out selection_fraction and "
                                   "report the IIS with epoch and lr chosen on that held-out part: how optimistic "
                                   "selecting on the evaluation split is (one more grid per repeat)")
    eval_fraction: float = option(0.2, "share of the data held out for evaluation when no eval data is given")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", "storage dtype of cached features (compute is float32)", choices=DTYPES)
    backend: str = option("auto", "how the heads are trained; auto = the fastest one available", choices=BACKENDS)
    cache_dir: str | None = option(None, "feature cache directory (unset: ~/.cache/iis_fast or $IIS_FAST_CACHE)")
    progress: bool = option(True, "show progress bars", cli=False)      # each command's --no-progress sets it
    extract_batch_size: int = option(64, "backbone batch size for extraction")
    element_batch_size: int = option(0, "backbone batch size for embedding concept elements; 0 = auto: on a CPU "
                                     "a batch of at most 2^19 input pixels (32 images at 128 px, 8 at 224 px: "
                                     "among the fastest measured, docs/throughput.md), 256 on a GPU")
    extract_dtype: str = option("auto", "backbone compute dtype for extraction: auto is bfloat16 on a GPU or a CPU "
                                "with native bf16, else float32 (IIS effect measured in docs/throughput.md)",
                                choices=("auto",) + DTYPES)
    channels_last: bool = option(True, "run the backbone in channels-last memory format (same float32 math)")
    fold_bn: bool = option(True, "fold eval-mode BatchNorm into the convolution feeding it for extraction (a copy "
                           "of the model, checked against it on the first batch; docs/throughput.md)")
    compile: bool = option(False, "torch.compile the backbone's forward for extraction")

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
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise IISInputError(f"{f.name}={getattr(self, f.name)!r}: choose one of {choices}")
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
        if int(self.element_batch_size) < 0:
            raise IISInputError(f"element_batch_size={self.element_batch_size}: must be a positive integer, or 0 "
                                "for auto")
        if self.extract_dtype not in DTYPES:           # "auto" is resolved in __post_init__
            raise IISInputError(f"extract_dtype={self.extract_dtype!r}: choose one of {('auto',) + DTYPES}")
        if self.repeats < 1:
            raise IISInputError(f"repeats={self.repeats}: must be >= 1 (the number of independent grids)")
        if self.bootstrap < 0:
            raise IISInputError(f"bootstrap={self.bootstrap}: must be >= 0 (0 turns the bootstrap off)")
        for frac in ("selection_fraction", "eval_fraction", "confidence"):
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
