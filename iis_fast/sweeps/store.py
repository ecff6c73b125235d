"""The sweep's results store: one SQLite file, one row per (checkpoint, library, config), crash-safe.

Rows are written only by the sweep's driver, all rows of one checkpoint in a single transaction, so a process
killed at any moment leaves either every row of that checkpoint or none (SQLite's journal guarantees it).
Each row keeps the full :class:`~iis_fast.result.IISResult` as JSON next to its main numbers as columns.
An ``attempts`` table logs every computation that came back (start/finish), which is how tests prove nothing was recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

__all__ = ["ResultStore", "config_hash", "RESULT_COLUMNS", "IGNORED_CONFIG_KEYS"]

#: IISConfig fields that do not change the numbers, left out of the config hash.
IGNORED_CONFIG_KEYS: tuple[str, ...] = ("progress", "cache_dir", "extract_batch_size", "device")

SCHEMA_VERSION = 1
RESULT_COLUMNS: tuple[str, ...] = (
    "checkpoint", "model", "path", "step", "library", "config_hash", "status", "iis", "acc_std", "acc_last",
    "num_concepts", "n_train", "n_eval", "feature_dim", "backend", "error", "seconds", "t_model", "t_extract",
    "t_concepts", "t_train", "meta_json", "config_json", "result_json", "host", "created_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    checkpoint   TEXT NOT NULL,
    model        TEXT NOT NULL,
    path         TEXT NOT NULL,
    step         INTEGER,
    library      TEXT NOT NULL,
    config_hash  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    iis          REAL,
    acc_std      REAL,
    acc_last     REAL,
    num_concepts INTEGER,
    n_train      INTEGER,
    n_eval       INTEGER,
    feature_dim  INTEGER,
    backend      TEXT,
    error        TEXT,
    seconds      REAL,
    t_model      REAL,
    t_extract    REAL,
    t_concepts   REAL,
    t_train      REAL,
    meta_json    TEXT,
    config_json  TEXT NOT NULL,
    result_json  TEXT,
    host         TEXT,
    created_at   TEXT NOT NULL,
    CHECK (status = 'failed' OR (result_json IS NOT NULL AND iis IS NOT NULL)),
    PRIMARY KEY (checkpoint, library, config_hash)
);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint  TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    status      TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def config_hash(config: dict[str, Any], data_key: str) -> str:
    """Identity of a measurement setting: every IISConfig field that changes the numbers, plus the data's key."""
    kept = {k: v for k, v in sorted(config.items()) if k not in IGNORED_CONFIG_KEYS}
    blob = json.dumps({"config": kept, "data": data_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


class ResultStore:
    """An SQLite results database (created on first use).

    Args:
        path: the ``.db`` file.
        timeout: seconds to wait for another writer's lock.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------------------------------------------ reads
    def done_keys(self, retry_failed: bool = False) -> set[tuple[str, str, str]]:
        """(checkpoint, library, config_hash) of stored rows to skip: ok rows, and failed ones unless retrying."""
        q = "SELECT checkpoint, library, config_hash FROM results"
        if retry_failed:
            q += " WHERE status = 'ok'"
        return {tuple(r) for r in self.conn.execute(q)}  # type: ignore[misc]

    def count(self, status: str | None = None) -> int:
        """Number of rows (with ``status`` if given)."""
        if status is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM results WHERE status = ?", (status,)).fetchone()[0])

    def dataframe(self, keys: Iterable[tuple[str, str, str]] | None = None, expand: bool = True) -> pd.DataFrame:
        """The results table as a DataFrame (rows of ``keys`` only, when given), ordered by step then path.

        With ``expand``, adds ``acc@s`` and ``arr@s`` columns per sparsity and the metadata columns of
        ``meta_json`` (e.g. ``meta.test_acc``).
        """
        df = pd.read_sql_query("SELECT * FROM results", self.conn)
        if keys is not None:
            wanted = set(keys)
            mask = [(c, l, h) in wanted for c, l, h in zip(df["checkpoint"], df["library"], df["config_hash"])]
            df = df[mask]
        df = df.sort_values(["step", "path", "library"], na_position="last", kind="stable").reset_index(drop=True)
        return expand_results(df) if expand else df

    def attempts(self) -> pd.DataFrame:
        """Every computation whose result reached the store (one per (checkpoint, config) scored)."""
        return pd.read_sql_query("SELECT * FROM attempts ORDER BY id", self.conn)

    # ----------------------------------------------------------------------------------------------- writes
    def write_checkpoint(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert (or replace) every row of one checkpoint, and log the computations, in one transaction.

        Each row's ``started_at``/``finished_at`` (worker clock, epoch seconds) go to the ``attempts`` table.
        """
        host = socket.gethostname()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for r in rows:
                rec = {c: r.get(c) for c in RESULT_COLUMNS}
                rec["host"] = rec["host"] or host
                rec["created_at"] = rec["created_at"] or _now()
                cols = ", ".join(RESULT_COLUMNS)
                marks = ", ".join("?" for _ in RESULT_COLUMNS)
                self.conn.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})",
                                  [rec[c] for c in RESULT_COLUMNS])
                now = time.time()
                self.conn.execute("INSERT INTO attempts (checkpoint, config_hash, started_at, finished_at, status) "
                                  "VALUES (?, ?, ?, ?, ?)", (rec["checkpoint"], rec["config_hash"],
                                                             r.get("started_at") or now, r.get("finished_at") or now,
                                                             rec["status"]))

    # ---------------------------------------------------------------------------------------------- exports
    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the expanded table to ``.csv`` or ``.parquet`` (by suffix); returns the path."""
        p = Path(path)
        df = self.dataframe()
        if p.suffix.lower() == ".csv":
            df.to_csv(p, index=False)
        elif p.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(p, index=False)
        else:
            from ..errors import IISInputError
            raise IISInputError(f"export path {str(p)!r}: use a .csv or .parquet suffix")
        return p

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def expand_results(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``acc@s`` / ``arr@s`` columns (from ``result_json``) and ``meta.*`` columns (from ``meta_json``)."""
    if df.empty:
        return df
    extra: list[dict[str, Any]] = []
    for rj, mj in zip(df["result_json"], df["meta_json"]):
        row: dict[str, Any] = {}
        if isinstance(rj, str) and rj:
            r = json.loads(rj)
            for s, a, q in zip(r["sparsities"], r["acc"], r["arr"]):
                row[f"acc@{s:g}"] = a
                row[f"arr@{s:g}"] = q
        if isinstance(mj, str) and mj:
            for k, v in json.loads(mj).items():
                try:
                    row[f"meta.{k}"] = float(v)
                except (TypeError, ValueError):
                    row[f"meta.{k}"] = v
        extra.append(row)
    add = pd.DataFrame(extra, index=df.index)
    add = add[[c for c in add.columns if c not in df.columns]]
    return pd.concat([df, add], axis=1)
