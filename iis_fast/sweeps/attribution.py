"""The ``attribution`` measure of a sweep: How-to-Probe attribution quality beside IIS, per checkpoint.

For each checkpoint the worker builds the backbone, extracts its last-stage spatial maps of the sweep's TRAIN and
evaluation images once (:func:`~iis_fast.probing.spatial.extract_spatial`), trains every requested probe at once
on them (:func:`~iis_fast.probing.train.probe_maps`; default linear and B-cos-2, CE and BCE) and scores each
probe's attribution maps with :func:`~iis_fast.probing.quality.attribution_quality` on the sweep's grids: GridPG,
entropy and Gini per probe x loss x method. The rows go to the ``attribution`` table of the same database, in the
same transaction as the checkpoint's IIS rows (:meth:`~iis_fast.sweeps.store.ResultStore.write_checkpoint`), so a
killed sweep leaves all of a checkpoint's rows or none, and a re-run skips what is stored.

The grids are chosen once per sweep, in the driver, and are the same images for every checkpoint: ``n_grids``
g x g grids of distinct classes drawn (seeded) from the evaluation images by
:func:`~iis_fast.probing.grids.make_grids` with no model, i.e. **without** the paper's p >= 0.95 filter. A filter
would pick other images for every checkpoint (early checkpoints have no confident probe at all), and checkpoints
would no longer be comparable. How many grid cells each probe classifies correctly with p >= 0.95 is stored
beside its scores (``confident_cells``), so a reader can restrict to confident probes. The grid cells' indices are
part of the measure's stored config (and of its config hash).
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..errors import IISInputError

__all__ = ["MEASURES", "ATTRIBUTION_STAGES", "AttributionConfig", "parse_measures", "choose_grids",
           "attribution_config", "attribution_rows", "failed_attribution_rows", "load_attribution",
           "ATTRIBUTION_COLUMNS"]

#: What a sweep can measure per checkpoint.
MEASURES: tuple[str, ...] = ("iis", "attribution")
#: Per-checkpoint stage seconds of the attribution measure: backbone build + checkpoint load, spatial maps of both
#: splits, training all probes, attribution maps and metrics of all probes and methods.
ATTRIBUTION_STAGES: tuple[str, ...] = ("t_model", "t_extract", "t_train", "t_attribute")
#: The metrics stored per probe x loss x method (grid mode of attribution_quality).
METRICS: tuple[str, ...] = ("gridpg", "entropy", "gini")

ATTRIBUTION_COLUMNS: tuple[str, ...] = (
    "checkpoint", "model", "path", "step", "config_hash", "content_hash", "head", "loss", "method", "status",
    "accuracy", "train_accuracy", "gridpg", "entropy", "gini", "confident_cells", "n_maps", "t_model", "t_extract",
    "t_train", "t_attribute", "seconds", "error", "config_json", "host", "created_at",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS attribution (
    checkpoint      TEXT NOT NULL,
    model           TEXT,
    path            TEXT,
    step            INTEGER,
    config_hash     TEXT NOT NULL,
    content_hash    TEXT,
    head            TEXT NOT NULL,
    loss            TEXT NOT NULL,
    method          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    accuracy        REAL,
    train_accuracy  REAL,
    gridpg          REAL,
    entropy         REAL,
    gini            REAL,
    confident_cells REAL,
    n_maps          INTEGER,
    t_model         REAL,
    t_extract       REAL,
    t_train         REAL,
    t_attribute     REAL,
    seconds         REAL,
    error           TEXT,
    config_json     TEXT NOT NULL,
    host            TEXT,
    created_at      TEXT NOT NULL,
    CHECK (status = 'failed' OR (gridpg IS NOT NULL AND accuracy IS NOT NULL)),
    PRIMARY KEY (checkpoint, config_hash, head, loss, method)
);
"""
#: Rows replaced because their checkpoint file changed (another content_hash), with the time they were replaced.
HISTORY_SCHEMA = ("CREATE TABLE IF NOT EXISTS attribution_history (" + ", ".join(ATTRIBUTION_COLUMNS)
                  + ", replaced_at TEXT)")
#: The ``library`` of the lease a driver takes on a checkpoint's attribution rows.
LEASE_LIBRARY = "attribution"


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the attribution measure (every field changes the numbers, so all are in its config hash).

    Attributes:
        heads, losses: the probes, as :func:`~iis_fast.probing.probe` (default linear and B-cos-2, CE and BCE).
        methods: attribution methods; ``bcos`` runs for B-cos heads only. Integrated Gradients (``ig``) is
            left out by default: it costs ``ig_steps`` backward passes per map, the most of any method.
        epochs, lr, lr_linear, hidden, batch_size: the probes' training recipe (``lr_linear`` for the linear head;
            ``hidden`` is the B-cos / MLP width: 256 here, not the paper's 2048, to keep a checkpoint's cost near
            IIS's on a CPU).
        grid_size, n_grids: the g x g grids, drawn once per sweep from the evaluation images (module docstring).
        ig_steps: Integrated Gradients nodes (Gauss-Legendre; the official 50 is ``ig_steps=50``).
        seed: probe initialisation, shuffling and the grid draw.
    """

    heads: tuple[str, ...] = ("linear", "bcos2")
    losses: tuple[str, ...] = ("ce", "bce")
    methods: tuple[str, ...] = ("ixg", "gradcam", "bcos")
    epochs: int = 10
    lr: float = 1e-3
    lr_linear: float = 3e-2
    hidden: int = 256
    batch_size: int = 128
    grid_size: int = 3
    n_grids: int = 8
    ig_steps: int = 8
    seed: int = 0

    @classmethod
    def from_options(cls, options: "AttributionConfig | Mapping[str, Any] | None") -> "AttributionConfig":
        """A config from a mapping of field values (strings ``"a,b"`` allowed for the tuple fields), checked."""
        if isinstance(options, AttributionConfig):
            return options
        opts = dict(options or {})
        unknown = set(opts) - set(cls.__dataclass_fields__)
        if unknown:
            raise IISInputError(f"attribution options {sorted(unknown)}: choose from "
                                f"{', '.join(cls.__dataclass_fields__)}")
        for k in ("heads", "losses", "methods"):
            if k in opts:
                v = opts[k]
                opts[k] = tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else tuple(v)
        cfg = cls(**opts)
        cfg.check()
        return cfg

    def check(self) -> None:
        """IISInputError for a name or number that cannot work."""
        from ..probing import HEAD_NAMES, LOSS_NAMES, METHODS
        for what, vals, allowed in (("heads", self.heads, HEAD_NAMES), ("losses", self.losses, LOSS_NAMES),
                                    ("methods", self.methods, METHODS)):
            bad = [v for v in vals if v not in allowed] if vals else ["(none)"]
            if bad:
                raise IISInputError(f"attribution {what}: {bad} not among {', '.join(allowed)}")
        for k in ("epochs", "hidden", "batch_size", "grid_size", "n_grids", "ig_steps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IISInputError(f"attribution {k}={v!r}: must be a positive whole number")
        if self.batch_size < 2:
            raise IISInputError("attribution batch_size must be >= 2 (BatchNorm in the B-cos heads)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def parse_measures(measures: str | Sequence[str]) -> tuple[str, ...]:
    """``"iis,attribution"`` or a sequence -> a checked tuple of measure names (order kept, no duplicates)."""
    items = [s.strip() for s in measures.split(",")] if isinstance(measures, str) else [str(s) for s in measures]
    items = list(dict.fromkeys(s for s in items if s))
    bad = [s for s in items if s not in MEASURES]
    if not items or bad:
        raise IISInputError(f"measures {bad or '(none)'}: choose one or more of {', '.join(MEASURES)}")
    return tuple(items)


# --------------------------------------------------------------------------------------------- the driver
def _all(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for b in loader:
        xs.append(torch.as_tensor(b[0]))
        ys.append(torch.as_tensor(b[1]))
    if not xs:
        raise IISInputError("attribution: the evaluation data is empty; the grids are drawn from it")
    return torch.cat(xs), torch.cat(ys).long()


def choose_grids(eval_loader: Iterable, cfg: AttributionConfig) -> list[list[int]]:
    """The sweep's grids, as indices into the evaluation images ``[n_grids][g*g]`` (row-major cells).

    :func:`~iis_fast.probing.grids.make_grids` without a model: g*g distinct classes per grid and one image of
    each, drawn with ``seed``; no confidence filter, so that every checkpoint is scored on the same images.
    """
    from ..probing.grids import make_grids
    x, y = _all(eval_loader)
    return make_grids(x, y, cfg.n_grids, cfg.grid_size, cfg.seed, models=None).source_indices.tolist()


def attribution_config(cfg: AttributionConfig, eval_loader: Iterable,
                       model_opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored config of the measure for one prepared data set: the settings, how checkpoints are read, and
    the grid cells (so the config hash identifies the images)."""
    return {"measure": "attribution", **cfg.to_dict(), **dict(model_opts or {}),
            "grid_indices": choose_grids(eval_loader, cfg)}


def configs_per_data(data_refs: Mapping[str, Any], cfg: AttributionConfig,
                     row_config: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The measure's (config hash, stored config) per prepared data set (``DataRef.key``), grids chosen once
    each; ``row_config`` (an IIS row config) gives how checkpoints are read (``checkpoint_key``,
    ``model_kwargs``)."""
    from ..data.sources import DataRef
    from .store import config_hash
    model_opts = {k: row_config[k] for k in ("checkpoint_key", "model_kwargs") if row_config.get(k)}
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for ref in data_refs.values():
        if isinstance(ref, DataRef) and ref.key not in out:
            stored_cfg = attribution_config(cfg, ref.loaders()[1], model_opts)
            out[ref.key] = (config_hash(stored_cfg, ref.key), stored_cfg)
    return out


# --------------------------------------------------------------------------------------------- the worker
def _grids(x: torch.Tensor, y: torch.Tensor, indices: Sequence[Sequence[int]], g: int) -> Any:
    from ..probing.grids import GridSet, tile
    src = torch.as_tensor(indices, dtype=torch.long)
    return GridSet(torch.stack([tile(x[s], g) for s in src]), y[src], src, g)


def attribution_rows(spec: Any, train_loader: Iterable, eval_loader: Iterable, config_hash: str,
                     cfg: Mapping[str, Any], content_hash: str | None = None) -> list[dict[str, Any]]:
    """Score one checkpoint's attribution quality: one row per probe x loss x method; never raises (a failure is
    one ``failed`` row with the error). Rows carry ``measure = "attribution"`` for the store."""
    from ..models import create_model
    from ..probing import attribution_quality, extract_spatial, probe_maps, ProbedModel
    from ..probing.grids import confident_mask
    from .executors import _error_text

    base = {"measure": "attribution", "checkpoint": spec.key, "model": spec.model, "path": spec.path,
            "step": spec.step, "config_hash": config_hash, "content_hash": content_hash,
            "config_json": json.dumps(cfg, sort_keys=True, default=str), "started_at": time.time()}
    t_start = time.perf_counter()
    try:
        c = AttributionConfig.from_options({k: cfg[k] for k in AttributionConfig.__dataclass_fields__ if k in cfg})
        t0 = time.perf_counter()
        backbone = create_model(spec.model, checkpoint=spec.path, checkpoint_key=cfg.get("checkpoint_key"),
                                **(cfg.get("model_kwargs") or {})).eval()
        t_model = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_maps = extract_spatial(backbone, train_loader)
        eval_maps = extract_spatial(backbone, eval_loader)
        t_extract = time.perf_counter() - t0
        res = probe_maps(train_maps, eval_maps, c.heads, c.losses, epochs=c.epochs,
                         lr={"default": c.lr, "linear": c.lr_linear}, batch_size=c.batch_size, hidden=c.hidden,
                         seed=c.seed)
        t_train = res.timings["train_s"]
        x, y = _all(eval_loader)
        grids = _grids(x, y, cfg["grid_indices"], c.grid_size)
        cells_x, cells_y = x[grids.source_indices.reshape(-1)], grids.cell_labels.reshape(-1)
        rows: list[dict[str, Any]] = []
        t_attr = 0.0
        for key, head in res.heads.items():
            hn, ln = key.split("/")
            model = ProbedModel(backbone, head)
            meths = [m for m in c.methods if m != "bcos" or hn.startswith("bcos")]
            t0 = time.perf_counter()
            q = attribution_quality(model, x, y, meths, METRICS, grids=grids, ig_steps=c.ig_steps)
            confident = float(confident_mask(model, cells_x, cells_y).float().mean())
            t_attr += time.perf_counter() - t0
            for m in meths:
                rows.append({**base, "head": hn, "loss": ln, "method": m, "status": "ok",
                             "accuracy": res.accuracies[key], "train_accuracy": res.train_accuracies[key],
                             **{k: q.scores[m][k] for k in METRICS}, "confident_cells": confident,
                             "n_maps": int(q.per_map[m]["gridpg"].numel())})
        stages = {"t_model": t_model, "t_extract": t_extract, "t_train": t_train, "t_attribute": t_attr}
        done = {"seconds": time.perf_counter() - t_start, "finished_at": time.time(), **stages}
        return [{**r, **done} for r in rows]
    except Exception as e:                                # noqa: BLE001 - a failing checkpoint must not stop a sweep
        return [{**base, "head": "", "loss": "", "method": "", "status": "failed", "error": _error_text(e),
                 "seconds": time.perf_counter() - t_start, "finished_at": time.time()}]


def failed_attribution_rows(task: Any, error: str) -> list[dict[str, Any]]:
    """The one ``failed`` row recording that ``task``'s attribution measure could not run."""
    from .executors import MAX_ERROR_CHARS
    spec, (h, cfg) = task.spec, task.attribution
    return [{"measure": "attribution", "checkpoint": spec.key, "model": spec.model, "path": spec.path,
             "step": spec.step, "config_hash": h, "content_hash": task.content_hash, "head": "", "loss": "",
             "method": "", "status": "failed", "error": error[:MAX_ERROR_CHARS],
             "config_json": json.dumps(cfg, sort_keys=True, default=str)}]


# ---------------------------------------------------------------------------------------------- the store
def create_table(conn: sqlite3.Connection) -> None:
    """Add the ``attribution`` and ``attribution_history`` tables to a results database (no-ops when they exist)."""
    conn.executescript(SCHEMA)
    conn.execute(HISTORY_SCHEMA)


def write_rows(conn: sqlite3.Connection, rows: Sequence[dict[str, Any]], host: str, now: str) -> None:
    """Replace one checkpoint's attribution rows, inside the caller's open transaction (the checkpoint's). Stored
    rows of another ``content_hash`` (the checkpoint file changed) move to ``attribution_history``, as IIS rows
    move to ``results_history``; a retried failure of the same file is replaced."""
    cols = ", ".join(ATTRIBUTION_COLUMNS)
    marks = ", ".join("?" for _ in ATTRIBUTION_COLUMNS)
    for key, content_hash in {(r["checkpoint"], r["config_hash"]): r.get("content_hash") for r in rows}.items():
        conn.execute(f"INSERT INTO attribution_history ({cols}, replaced_at) SELECT {cols}, ? FROM attribution "
                     "WHERE checkpoint = ? AND config_hash = ? AND content_hash IS NOT ?", (now, *key, content_hash))
        conn.execute("DELETE FROM attribution WHERE checkpoint = ? AND config_hash = ?", key)
        conn.execute("DELETE FROM leases WHERE checkpoint = ? AND library = ? AND config_hash = ?",
                     (key[0], LEASE_LIBRARY, key[1]))
    for r in rows:
        rec = {c: r.get(c) for c in ATTRIBUTION_COLUMNS}
        rec["host"] = rec["host"] or host
        rec["created_at"] = rec["created_at"] or now
        conn.execute(f"INSERT INTO attribution ({cols}) VALUES ({marks})", [rec[c] for c in ATTRIBUTION_COLUMNS])
    for key, r in {(r["checkpoint"], r["config_hash"]): r for r in rows}.items():
        t = time.time()
        conn.execute("INSERT INTO attempts (checkpoint, config_hash, started_at, finished_at, status, content_hash) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (*key, r.get("started_at") or t, r.get("finished_at") or t,
                                                   r["status"], r.get("content_hash")))


def stored(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(checkpoint, config_hash) -> (status, content_hash) of every checkpoint with attribution rows ("failed"
    when its rows are a failure record)."""
    q = ("SELECT checkpoint, config_hash, MIN(status), MAX(content_hash) FROM attribution "
         "GROUP BY checkpoint, config_hash")
    return {(c, h): (s, ch) for c, h, s, ch in conn.execute(q)}


def load_attribution(db: Any, keys: Iterable[tuple[str, str]] | None = None,
                     status: str | None = "ok", history: bool = False) -> pd.DataFrame:
    """The ``attribution`` table of a sweep database (rows of ``keys`` = (checkpoint, config_hash) only, when
    given; with ``status`` only), ordered by step, path, head, loss, method. ``history=True``: the rows replaced
    because their checkpoint file changed (``attribution_history``, with ``replaced_at``) instead."""
    from .store import ResultStore
    conn = db.conn if isinstance(db, ResultStore) else None
    own = None
    if conn is None:
        own = ResultStore(db, create=False)
        conn = own.conn
    try:
        df = pd.read_sql_query(f"SELECT * FROM {'attribution_history' if history else 'attribution'}", conn)
    finally:
        if own is not None:
            own.close()
    if keys is not None:
        wanted = set(keys)
        df = df[[(c, h) in wanted for c, h in zip(df["checkpoint"], df["config_hash"])]]
    if status is not None:
        df = df[df["status"] == status]
    return df.sort_values(["step", "path", "head", "loss", "method"], na_position="last",
                          kind="stable").reset_index(drop=True)
