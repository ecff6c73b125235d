"""Exceptions raised on bad input. Every message names the argument at fault and how to fix it."""
from __future__ import annotations


class IISInputError(ValueError):
    """Bad user input: wrong shape, NaN features, labels out of range, empty loader, ..."""


class CheckpointError(IISInputError):
    """A checkpoint that cannot be read, or whose keys do not match the model."""


class DataFileError(IISInputError):
    """A data file (e.g. an FFCV .beton) that is missing, truncated or corrupt."""


class BackendUnavailable(RuntimeError):
    """A requested compute backend cannot run on this machine (not built, no GPU, ...)."""


class IISWarning(UserWarning):
    """A result that is computed but should not be trusted as is (a probe at chance level, a corrupt cache entry
    that was recomputed, ...). The same text goes to ``IISResult.warnings`` where a result carries it."""


def one_line_warnings(prog: str = "iis-fast") -> None:
    """Print every warning of this process as one line, ``<prog>: <Category>: <message>`` (the CLI and its sweep
    workers: a checkpoint that was unwrapped, a result at chance level, ... each say so in one line)."""
    import warnings
    warnings.formatwarning = lambda message, category, *_, **__: f"{prog}: {category.__name__}: {message}\n"
