"""``iis-fast sweep`` / ``report`` / ``make-checkpoints``; :func:`register` adds them to the main parser."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import SWEEP_EXTRACT_BATCH_SIZE
from ..cli import (add_data_options, add_model_options, add_progress_option, add_score_options, model_options,
                   score_options)

__all__ = ["register"]


def _slurm_parameters(text: str) -> dict[str, Any]:
    """The ``--slurm`` JSON object, or IISInputError saying what is wrong with it."""
    from ..errors import IISInputError
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise IISInputError(f"--slurm is not valid JSON ({e.msg} at character {e.pos}): give an object such as "
                            '\'{"slurm_partition": "gpu", "timeout_min": 120}\'') from None
    if not isinstance(params, dict):
        raise IISInputError(f"--slurm must be a JSON object of submitit parameters, got {type(params).__name__}")
    return params


def cmd_sweep(a: argparse.Namespace) -> int:
    from .runner import sweep
    from .store import ResultStore, check_export_path

    for path in a.export or []:                          # before the sweep, not after hours of scoring
        check_export_path(path)
    ex_opts: dict[str, Any] = {}
    if a.ray_address:
        ex_opts["address"] = a.ray_address
    if a.executor in ("slurm", "submitit"):
        ex_opts["folder"] = a.submitit_folder
        if a.cluster:
            ex_opts["cluster"] = a.cluster
        if a.slurm:
            ex_opts["parameters"] = _slurm_parameters(a.slurm)
    elif a.slurm:
        _slurm_parameters(a.slurm)
    df = sweep(a.checkpoints, a.data, arch=a.arch, out=a.out, executor=a.executor, workers=a.workers,
               retry_failed=a.retry_failed, eval_data=a.eval_data, chunk_size=a.chunk_size, threads=a.threads,
               num_gpus=a.gpus, executor_options=ex_opts, progress=not a.no_progress, measures=a.measure,
               attribution=_attribution_options(a), **model_options(a), **score_options(a))
    ok = df[df["status"] == "ok"] if not df.empty else df
    print(f"{len(ok)} ok / {len(df)} rows in {a.out}")
    att = df.attrs.get("attribution")
    if att is not None:
        print(f"{int((att['status'] == 'ok').sum())} ok / {len(att)} attribution rows in {a.out}")
        if not att.empty and (att["status"] != "ok").all():
            first = str(att["error"].dropna().iloc[0]).splitlines()[0] if att["error"].notna().any() else "?"
            print(f"iis-fast: error: the attribution measure failed for every checkpoint; first error: {first}",
                  file=sys.stderr)
            return 1
    with ResultStore(a.out) as store:
        for path in a.export or []:
            print(f"exported {store.export(path)}")
    if not df.empty and ok.empty:
        first = str(df["error"].dropna().iloc[0]).splitlines()[0] if df["error"].notna().any() else "?"
        print(f"iis-fast: error: every checkpoint failed ({len(df)} rows in {a.out}); first error: {first}",
              file=sys.stderr)
        return 1
    return 0


#: ``sweep`` options of the attribution measure -> AttributionConfig fields.
_ATTRIBUTION_OPTIONS = {"probe_heads": "heads", "probe_losses": "losses", "probe_methods": "methods",
                        "probe_epochs": "epochs", "probe_hidden": "hidden", "probe_seed": "seed",
                        "grids": "n_grids", "ig_steps": "ig_steps"}


def _attribution_options(a: argparse.Namespace) -> dict[str, Any]:
    """The attribution measure's options given on the command line (the rest keep AttributionConfig's defaults)."""
    return {field: getattr(a, opt) for opt, field in _ATTRIBUTION_OPTIONS.items() if getattr(a, opt) is not None}


def _add_attribution_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("attribution measure (--measure iis,attribution; iis_fast.sweeps.attribution)")
    g.add_argument("--probe-heads", metavar="LIST", help="probe heads (default linear,bcos2)")
    g.add_argument("--probe-losses", metavar="LIST", help="probe losses (default ce,bce)")
    g.add_argument("--probe-methods", metavar="LIST", help="attribution methods (default ixg,gradcam,bcos; "
                                                           "also ig)")
    g.add_argument("--probe-epochs", type=int, metavar="N", help="probe training epochs (default 10)")
    g.add_argument("--probe-hidden", type=int, metavar="N", help="B-cos / MLP hidden width (default 256)")
    g.add_argument("--probe-seed", type=int, metavar="S", help="probe init, shuffling and grid draw (default 0)")
    g.add_argument("--grids", type=int, metavar="N", help="3x3 grids drawn once per sweep from the evaluation "
                                                          "images (default 8)")
    g.add_argument("--ig-steps", type=int, metavar="N", help="Integrated Gradients nodes (default 8)")


def cmd_report(a: argparse.Namespace) -> int:
    from .report import make_report

    rep = make_report(a.db, a.out_dir, n_boot=a.n_boot, max_rows=a.max_rows)
    print(rep.text)
    for name, path in rep.files.items():
        print(f"{name}: {path}")
    return 0


def cmd_make_checkpoints(a: argparse.Namespace) -> int:
    from .make_checkpoints import make_checkpoints

    s = make_checkpoints(a.out_dir, epochs=a.epochs, batch_size=a.batch_size, num_checkpoints=a.num_checkpoints,
                         lr=a.lr, seed=a.seed, threads=a.threads, progress=not a.no_progress)
    print(f"{s.num_checkpoints} checkpoints over {s.steps} steps ({s.epochs:.2f} epochs) in {s.out_dir}; "
          f"final test accuracy {s.final_test_acc:.4f}; {s.seconds:.0f}s. Sweep them with:\n"
          f"  iis-fast sweep {s.manifest} --data fashion-mnist --out results.db")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``sweep``, ``report`` and ``make-checkpoints`` subcommands to the main ``iis-fast`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = subparsers.add_parser(
        "sweep", help="score many checkpoints into a resumable results database", formatter_class=fmt,
        description="Score every checkpoint into an SQLite database (one row per checkpoint x library x config, "
                    "the full result as JSON). Re-running the same command skips what is stored, so a killed "
                    "sweep resumes where it stopped; failed checkpoints are recorded with their error.",
        epilog="examples:\n"
               "  iis-fast make-checkpoints runs/fmnist\n"
               "  iis-fast sweep runs/fmnist/checkpoints.csv --data fashion-mnist:n_train=2000,n_eval=1000 "
               "--out results.db\n"
               "  iis-fast sweep 'runs/*/step_*.pt' --arch iis_smallcnn --executor ray --workers 8\n"
               "  iis-fast sweep my_run/ --arch resnet18 --data imgs/train --eval-data imgs/val --out r18.db\n"
               "  iis-fast report results.db")
    s.add_argument("checkpoints", nargs="+",
                   help="checkpoint files, folders, globs, or .csv/.txt lists of model_name,path[,step,...]")
    add_data_options(s, default="fashion-mnist",
                     default_note="; default fashion-mnist (2000 train / 1000 test images)")
    s.add_argument("--arch", help="timm model name for checkpoints that do not name one (e.g. resnet18, iis_smallcnn)")
    s.add_argument("--out", default="results.db", help="results database (SQLite; default results.db)")
    s.add_argument("--executor", default="local", choices=["local", "inline", "ray", "slurm"],
                   help="local: process pool (default); inline: in this process; ray: Ray tasks; "
                        "slurm: submitit array jobs")
    s.add_argument("--workers", type=int, default=None, help="parallel workers (default: CPU cores)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores/workers)")
    s.add_argument("--chunk-size", type=int, default=None, help="checkpoints per Ray task / Slurm job")
    s.add_argument("--gpus", type=float, default=0, help="GPUs per Ray task / Slurm job (with --device cuda)")
    s.add_argument("--retry-failed", action="store_true", help="recompute checkpoints stored as failed")
    s.add_argument("--ray-address", help="connect to this Ray cluster instead of starting a local one")
    s.add_argument("--submitit-folder", default="submitit_logs", help="submitit logs/results folder")
    s.add_argument("--cluster", help="submitit cluster: slurm (auto-detected), local, debug")
    s.add_argument("--slurm", help='JSON of submitit parameters, e.g. \'{"slurm_partition": "gpu", "timeout_min": 120}\'')
    s.add_argument("--export", action="append", help="also export the table to this .csv or .parquet (repeatable)")
    s.add_argument("--measure", default="iis", help="what to measure per checkpoint: iis (default), attribution "
                                                    "(How-to-Probe GridPG, entropy, Gini of probes), or iis,attribution")
    _add_attribution_options(s)
    add_progress_option(s)
    add_model_options(s)
    add_score_options(s, multi_library=True, defaults={"extract_batch_size": SWEEP_EXTRACT_BATCH_SIZE})
    s.set_defaults(func=cmd_sweep)

    r = subparsers.add_parser(
        "report", help="tables and plots of a sweep database", formatter_class=fmt,
        description="Print the results table and the IIS-vs-accuracy correlations (Spearman, Pearson, bootstrap "
                    "95%% CIs); write report.html, results.csv and PNGs: iis_vs_acc.png, arr_curves.png and, "
                    "for one run's checkpoints, trajectory.png (IIS / accuracy vs training step).")
    r.add_argument("db", help="the sweep's results database")
    r.add_argument("--out-dir", help="where to write the report (default <db>_report/)")
    r.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    r.add_argument("--max-rows", type=int, default=40, help="rows shown in the console table")
    r.set_defaults(func=cmd_report)

    m = subparsers.add_parser(
        "make-checkpoints", help="train the small Fashion-MNIST CNN and save a checkpoint trajectory",
        description="Train iis_smallcnn on Fashion-MNIST on the CPU, saving step_XXXXXX.pt every N steps "
                    "(step 0 included) and checkpoints.csv (model_name,path,step,epoch,test_acc) to sweep.")
    m.add_argument("out_dir", help="folder for the checkpoints")
    m.add_argument("--epochs", type=float, default=3.0, help="passes over the 60k TRAIN images (default 3)")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--num-checkpoints", type=int, default=100, help="checkpoints after step 0 (default 100)")
    m.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, cosine-decayed (default 2e-3)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_progress_option(m)
    m.set_defaults(func=cmd_make_checkpoints)


def main(argv: list[str] | None = None) -> int:
    """Run one of these subcommands standalone: ``python -m iis_fast.sweeps.cli sweep ...``."""
    from ..cli import run_command
    p = argparse.ArgumentParser(prog="iis-fast")
    register(p.add_subparsers(dest="command", required=True))
    return run_command(p, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
