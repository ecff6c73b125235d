"""The sweep's results store: one SQLite file, one row per (checkpoint, library, config), crash-safe.

Rows are written only by the sweep's driver, all rows of one checkpoint in a single transaction, so a process
killed at any moment leaves either every row of that checkpoint or none (SQLite's journal guarantees it).
Each row keeps the full :class:`~iis_fast.result.IISResult` as JSON next to its main numbers as columns.
An ``attempts`` table logs every computation that came back (start/finish), which is how tests prove nothing was recomputed.

Content identity: each row records ``content_hash``, the SHA-256 of the checkpoint file it scored (hashed once per
file version: ``file_hashes`` remembers it by inode, size and timestamps). A file overwritten with other weights is
scored again; the new row replaces the old one in ``results`` and the old row is kept, with ``replaced_at``, in
``results_history``.

Leases: before scoring a checkpoint a driver claims its rows in ``leases`` (owner, expiry renewed while it works).
A second sweep on the same database skips what another live driver is computing; a lease whose owner died (same
host, process gone) or expired is taken over.
"""
from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import pandas as pd

from ..config import IISConfig
from ..errors import IISInputError

__all__ = ["ResultStore", "StoredRow", "config_hash", "check_export_path", "RESULT_COLUMNS", "IGNORED_CONFIG_KEYS",
           "EXPORT_SUFFIXES", "LEASE_SECONDS"]

#: IISConfig fields that do not change the numbers, left out of the config hash.
IGNORED_CONFIG_KEYS: tuple[str, ...] = ("progress", "cache_dir", "extract_batch_size", "element_batch_size",
                                         "device")

SCHEMA_VERSION = 2
RESULT_COLUMNS: tuple[str, ...] = (
    "checkpoint", "model", "path", "step", "library", "config_hash", "status", "iis", "acc_std", "acc_last",
    "num_concepts", "n_train", "n_eval", "feature_dim", "backend", "error", "seconds", "t_model", "t_extract",
    "t_concepts", "t_train", "meta_json", "config_json", "result_json", "host", "created_at", "content_hash",
    "warnings",
)
#: Columns added since schema 1, with their types (added to older databases when opened).
_ADDED_COLUMNS: dict[str, dict[str, str]] = {"results": {"content_hash": "TEXT", "warnings": "TEXT"},
                                             "attempts": {"content_hash": "TEXT"}}
#: Suffixes :meth:`ResultStore.export` writes.
EXPORT_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")
#: Seconds a lease lasts without renewal (a live driver renews it every LEASE_SECONDS / 4).
LEASE_SECONDS = 300.0

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
    content_hash TEXT,
    warnings     TEXT,
    CHECK (status = 'failed' OR (result_json IS NOT NULL AND iis IS NOT NULL)),
    PRIMARY KEY (checkpoint, library, config_hash)
);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint  TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    status      TEXT,
    content_hash TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    checkpoint TEXT NOT NULL, library TEXT NOT NULL, config_hash TEXT NOT NULL, content_hash TEXT,
    owner TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (checkpoint, library, config_hash)
);
"""
_HISTORY = "CREATE TABLE IF NOT EXISTS results_history (" + ", ".join(RESULT_COLUMNS) + ", replaced_at TEXT)"


class StoredRow(NamedTuple):
    """What the store holds for one (checkpoint, library, config_hash)."""

    status: str
    content_hash: str | None          # None: a row written before content hashes were recorded
    created_at: str


def check_export_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if :meth:`ResultStore.export` can write it (suffix, folder, parquet engine), else IISInputError.

    Checked before a sweep, so a typo does not surface only after hours of scoring.
    """
    p = Path(path)
    if p.suffix.lower() not in EXPORT_SUFFIXES:
        raise IISInputError(f"export path {str(p)!r}: use a .csv or .parquet suffix")
    if p.is_dir():
        raise IISInputError(f"export path {str(p)!r} is a directory")
    if not p.parent.is_dir():
        raise IISInputError(f"export path {str(p)!r}: folder {str(p.parent)!r} does not exist")
    if p.suffix.lower() != ".csv":
        try:
            pd.io.parquet.get_engine("auto")
        except ImportError as e:
            raise IISInputError(f"export path {str(p)!r}: parquet needs pyarrow or fastparquet ({e})") from None
    return p


def _owner_alive(owner: str) -> bool:
    """False when ``owner`` (host:pid:token) is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return True                     # another machine: only the expiry tells
    try:
        os.kill(int(rest.partition(":")[0]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


#: IISConfig fields added after rows were first stored: left out of the hash at their default, so a database
#: written before they existed is not re-scored (its IIS is what the default computes; only the intervals are absent).
_NEW_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(IISConfig)
                                       if f.name in ("repeats", "bootstrap", "confidence", "selection_check")}


def config_hash(config: dict[str, Any], data_key: str) -> str:
    """Identity of a measurement setting: every IISConfig field that changes the numbers, plus the data's key."""
    kept = {k: v for k, v in sorted(config.items()) if k not in IGNORED_CONFIG_KEYS
            and not (k in _NEW_FIELD_DEFAULTS and v == _NEW_FIELD_DEFAULTS[k])}
    blob = json.dumps({"config": kept, "data": data_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def created_epoch(created_at: str) -> float:
    """A row's ``created_at`` (UTC, to the second) as epoch seconds."""
    return float(calendar.timegm(time.strptime(created_at, "%Y-%m-%dT%H:%M:%S")))


class ResultStore:
    """An SQLite results database.

    Args:
        path: the ``.db`` file.
        timeout: seconds to wait for another writer's lock.
        create: create the database when it does not exist (``False``: an IISInputError says it is missing, as
            ``iis-fast report`` wants).

    Raises:
        IISInputError: ``path`` is a directory, not an SQLite file, an SQLite database of something else, or
            missing with ``create=False``.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IISInputError(f"results database {str(self.path)!r} is a directory; give a .db file path")
        if not self.path.exists():
            if not create:
                raise IISInputError(f"results database {str(self.path)!r} does not exist")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "results" not in tables:
                raise IISInputError(f"{str(self.path)!r} is an SQLite database, but not an iis-fast results "
                                    f"database (its tables: {sorted(tables)[:6]})")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            self._migrate()
            from .attribution import create_table
            create_table(self.conn)                     # the attribution measure's rows (sweeps/attribution.py)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise IISInputError(f"{str(self.path)!r} is not an iis-fast results database (SQLite: {e})") from None
        except BaseException:
            self.conn.close()
            raise
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    def _migrate(self) -> None:
        """Add what schema 2 added to a database written by schema 1 (columns, history table)."""
        for table, cols in _ADDED_COLUMNS.items():
            have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            for col, typ in cols.items():
                if col not in have:
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
        self.conn.execute(_HISTORY)
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                          (str(SCHEMA_VERSION), SCHEMA_VERSION))

    # ------------------------------------------------------------------------------------------------ reads
    def done_keys(self, retry_failed: bool = False) -> set[tuple[str, str, str]]:
        """(checkpoint, library, config_hash) of stored rows to skip: ok rows, and failed ones unless retrying."""
        q = "SELECT checkpoint, library, config_hash FROM results"
        if retry_failed:
            q += " WHERE status = 'ok'"
        return {tuple(r) for r in self.conn.execute(q)}  # type: ignore[misc]

    def stored(self) -> dict[tuple[str, str, str], StoredRow]:
        """Every stored row's (checkpoint, library, config_hash) -> status, content hash and creation time."""
        q = "SELECT checkpoint, library, config_hash, status, content_hash, created_at FROM results"
        return {(c, l, h): StoredRow(s, ch, t) for c, l, h, s, ch, t in self.conn.execute(q)}

    def content_hash(self, path: str | os.PathLike[str]) -> str:
        """SHA-256 of a checkpoint file, computed once per file version (inode, size, mtime, ctime) and remembered
        in ``file_hashes``; ``"missing"`` for a file that does not exist (it fails when scored)."""
        p = os.fspath(path)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return "missing"
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        row = self.conn.execute("SELECT ino, size, mtime_ns, ctime_ns, sha256 FROM file_hashes WHERE path = ?",
                                (p,)).fetchone()
        if row is not None and tuple(row[:4]) == sig:
            return str(row[4])
        from ..features import file_sha256
        try:
            digest = file_sha256(p)
        except OSError as e:
            return f"unreadable:{e.errno}"
        self.conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)", (p, *sig, digest))
        return digest

    def adopt_content_hash(self, key: tuple[str, str, str], content_hash: str) -> None:
        """Record ``content_hash`` on a row stored before content hashes existed (its file is unchanged since)."""
        self.conn.execute("UPDATE results SET content_hash = ? WHERE checkpoint = ? AND library = ? AND "
                          "config_hash = ? AND content_hash IS NULL", (content_hash, *key))

    def count(self, status: str | None = None) -> int:
        """Number of rows (with ``status`` if given)."""
        if status is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM results WHERE status = ?", (status,)).fetchone()[0])

    def dataframe(self, keys: Iterable[tuple[str, str, str]] | None = None, expand: bool = True) -> pd.DataFrame:
        """The results table as a DataFrame (rows of ``keys`` only, when given), ordered by step then path.

        With ``expand``, adds ``acc@s`` and ``arr@s`` columns per sparsity and the metadata columns of
        ``meta_json`` (e.g. ``meta.test_acc``). ``warnings`` holds the result's warnings (one per line), e.g. an
        acc_std at chance level.
        """
        df = pd.read_sql_query("SELECT * FROM results", self.conn)
        if keys is not None:
            wanted = set(keys)
            mask = [(c, l, h) in wanted for c, l, h in zip(df["checkpoint"], df["library"], df["config_hash"])]
            df = df[mask]
        df = df.sort_values(["step", "path", "library"], na_position="last", kind="stable").reset_index(drop=True)
        return expand_results(df) if expand else df

    def history(self) -> pd.DataFrame:
        """Rows replaced because their checkpoint file changed, with ``replaced_at``."""
        return pd.read_sql_query("SELECT * FROM results_history ORDER BY replaced_at", self.conn)

    def attempts(self) -> pd.DataFrame:
        """Every computation whose result reached the store (one per (checkpoint, config) scored)."""
        return pd.read_sql_query("SELECT * FROM attempts ORDER BY id", self.conn)

    # ----------------------------------------------------------------------------------------------- leases
    def claim(self, keys: Sequence[tuple[str, str, str]], content_hash: str | None = None,
              seconds: float = LEASE_SECONDS, retry_failed: bool = False) -> bool:
        """Claim every row of one checkpoint for this store's owner, or none of them.

        Refused (False) when another live owner holds an unexpired lease on one of ``keys``, or when a row for
        ``content_hash`` was stored meanwhile (by another driver). Expired leases and leases of dead processes of
        this host are taken over.
        """
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for c, l, h in keys:
                lease = self.conn.execute("SELECT owner, expires_at FROM leases WHERE checkpoint = ? AND library = ? "
                                          "AND config_hash = ?", (c, l, h)).fetchone()
                if lease is not None and lease[0] != self.owner and lease[1] > now and _owner_alive(lease[0]):
                    return False
                row = self.conn.execute("SELECT status, content_hash FROM results WHERE checkpoint = ? AND "
                                        "library = ? AND config_hash = ?", (c, l, h)).fetchone()
                if row is not None and content_hash is not None and row[1] == content_hash \
                        and (row[0] == "ok" or not retry_failed):
                    return False
            self.conn.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                                  [(c, l, h, content_hash, self.owner, now + seconds) for c, l, h in keys])
        return True

    def renew_leases(self, seconds: float = LEASE_SECONDS) -> int:
        """Push back the expiry of every lease this store's owner holds; returns how many."""
        cur = self.conn.execute("UPDATE leases SET expires_at = ? WHERE owner = ?", (time.time() + seconds, self.owner))
        return int(cur.rowcount)

    def release_leases(self) -> None:
        """Drop every lease this store's owner holds (rows written meanwhile dropped theirs already)."""
        self.conn.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    def leases(self) -> pd.DataFrame:
        """The current leases (checkpoint, library, config_hash, content_hash, owner, expires_at)."""
        return pd.read_sql_query("SELECT * FROM leases", self.conn)

    # ----------------------------------------------------------------------------------------------- writes
    def write_checkpoint(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert (or replace) every row of one checkpoint, and log the computations, in one transaction.

        Each row's ``started_at``/``finished_at`` (worker clock, epoch seconds) go to the ``attempts`` table. A
        stored row of another ``content_hash`` (its file changed) is moved to ``results_history``; the rows'
        leases are dropped.
        """
        from .attribution import write_rows
        host = socket.gethostname()
        cols = ", ".join(RESULT_COLUMNS)
        marks = ", ".join("?" for _ in RESULT_COLUMNS)
        attribution = [r for r in rows if r.get("measure") == "attribution"]
        rows = [r for r in rows if r.get("measure") != "attribution"]
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            write_rows(self.conn, attribution, host, _now())  # the checkpoint's attribution rows, same transaction
            for r in rows:
                rec = {c: r.get(c) for c in RESULT_COLUMNS}
                rec["host"] = rec["host"] or host
                rec["created_at"] = rec["created_at"] or _now()
                if isinstance(rec["warnings"], (list, tuple)):
                    rec["warnings"] = "\n".join(rec["warnings"]) or None
                key = (rec["checkpoint"], rec["library"], rec["config_hash"])
                self.conn.execute(f"INSERT INTO results_history ({cols}, replaced_at) SELECT {cols}, ? FROM results "
                                  "WHERE checkpoint = ? AND library = ? AND config_hash = ? AND content_hash IS NOT ?",
                                  (_now(), *key, rec["content_hash"]))
                self.conn.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})",
                                  [rec[c] for c in RESULT_COLUMNS])
                self.conn.execute("DELETE FROM leases WHERE checkpoint = ? AND library = ? AND config_hash = ?", key)
                now = time.time()
                self.conn.execute("INSERT INTO attempts (checkpoint, config_hash, started_at, finished_at, status, "
                                  "content_hash) VALUES (?, ?, ?, ?, ?, ?)",
                                  (rec["checkpoint"], rec["config_hash"], r.get("started_at") or now,
                                   r.get("finished_at") or now, rec["status"], rec["content_hash"]))

    # ---------------------------------------------------------------------------------------------- exports
    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the expanded table to ``.csv`` or ``.parquet`` (by suffix); returns the path."""
        p = check_export_path(path)
        df = self.dataframe()
        if p.suffix.lower() == ".csv":
            df.to_csv(p, index=False)
        else:
            df.to_parquet(p, index=False)
        return p

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def interval_columns(u: dict[str, Any]) -> dict[str, Any]:
    """The error bars of a result's ``uncertainty`` (docs/spec.md §1.10) as table columns: ``repeats``; with
    repeats >= 2 ``iis_sd``, ``iis_lo``, ``iis_hi`` (seed interval of the mean); ``iis_boot_lo`` / ``iis_boot_hi``
    (evaluation bootstrap); ``iis_holdout`` (epoch and lr chosen on a held-out part of TRAIN)."""
    out: dict[str, Any] = {"repeats": u.get("repeats", 1)}
    if "iis_ci" in u:
        out.update(iis_sd=u["iis_sd"], iis_lo=u["iis_ci"][0], iis_hi=u["iis_ci"][1])
    if "bootstrap" in u:
        out.update(iis_boot_lo=u["bootstrap"]["iis_ci"][0], iis_boot_hi=u["bootstrap"]["iis_ci"][1])
    if "selection" in u:
        out["iis_holdout"] = u["selection"]["iis"]
    return out


def expand_results(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``acc@s`` / ``arr@s`` and the error-bar columns of :func:`interval_columns` (from ``result_json``) and
    ``meta.*`` columns (from ``meta_json``)."""
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
            row.update(interval_columns(r.get("uncertainty") or {}))
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
