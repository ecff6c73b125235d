"""bench/gpu_check.py cannot rot while no GPU is lent: its dry run (every step on the CPU at tiny sizes, Triton
interpreted in a child process) must produce real numbers for every step, the Triton backend must agree with the
cpp backend on real Fashion-MNIST / MobileNetV2 features, and a step that dies must not take the others with it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STEPS = ("environment", "gpu_tests", "agreement", "matmul", "grid", "extraction")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 600) -> tuple[dict, str, float]:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ if env is None else env)
    env.pop("OUT", None)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(out.read_text()), r.stdout, wall


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_dry_run_every_step_has_real_numbers(tmp_path):
    res, stdout, wall = _run(tmp_path)
    steps = res["steps"]
    assert res["mode"] == "dry-run" and tuple(steps) == STEPS
    assert {n: r["status"] for n, r in steps.items()} == {n: "ok" for n in STEPS}, \
        {n: r.get("error") for n, r in steps.items()}
    assert wall < res["budget_s"] + 30

    env = steps["environment"]
    assert env["triton_interpret"] is True and env["cuda_available"] is False
    assert env["backends"]["cpu"]["cpp"] == "" and env["torch"] and env["git"]

    # the GPU tests are collected (so the marker and the command work) and skipped for want of CUDA
    t = steps["gpu_tests"]
    assert t["returncode"] == 0 and t["counts"].get("skipped", 0) >= 2 and t["counts"].get("failed", 0) == 0
    assert "tests/test_triton_kernels.py" in t["files"]

    # Triton (interpreted) vs cpp on real features: same per-epoch accuracies, same IIS
    a = steps["agreement"]
    assert a["features"]["source"].startswith("Fashion-MNIST, MobileNetV2") and a["D"] == 1280 and a["K"] == 10
    assert a["oracle"] == "cpp" and a["entries"] == a["epochs"] * len(a["lrs"]) * (1 + len(a["sparsities"]))
    assert a["strict_epochs"] == a["epochs"] == 2 and a["entries_strict"] == a["entries"]
    assert a["max_diff_samples_strict"] <= 1 and a["iis_diff"] <= 0.005 and a["pass"] is True
    assert 0.0 < a["iis_oracle"] <= 1.0 and a["acc_std_oracle"] > 0.3      # 10 classes: well above chance (0.1)

    m = steps["matmul"]["tflops"]
    assert _positive(m["float32"]) and _positive(m["bfloat16"]) and m["tf32"] is None

    g = steps["grid"]
    assert len(g["configs"]) == 2 and _positive(g["needed_tflop_per_epoch"])
    for c in g["configs"]:
        assert "error" not in c, c
        for key in ("epoch_s", "extrapolated_30_epochs_s", "needed_tflops", "predicted_epoch_s"):
            assert _positive(c[key]), (key, c)
        assert c["extrapolated_30_epochs_s"] >= 30 * c["epoch_s"] * (1 - 1e-3)   # both rounded to 4 digits
        assert c["measured"].startswith("1 full epoch")
    assert _positive(g["configs"][0]["pct_of_matmul"])                     # against fp32 matmul of the same run

    e = steps["extraction"]
    assert e["model"] == "test_resnet" and "DataLoader" in e["loader"] and _positive(e["loader_only_images_per_s"])
    for dtype in ("float32", "bfloat16"):
        r = e["dtypes"][dtype]
        assert _positive(r["model_only_images_per_s"]) and _positive(r["e2e_images_per_s"]) and r["feature_dim"] > 0

    assert res["summary"]["failed"] == [] and res["summary"]["agreement_pass"] is True
    table = _gpu_check().render_markdown(res)
    assert table in stdout and "Dry run on the CPU" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + 1 + 1 + 2 + 2                              # header, tests, agreement, matmul, 2 + 2


def test_a_step_that_dies_leaves_the_others(tmp_path):
    """One child process per step (the GPU default): a step whose process exits mid-way is recorded as failed
    with its output, and the next step still runs and reports."""
    env = dict(os.environ, GPU_CHECK_CRASH="environment")
    res, stdout, _ = _run(tmp_path, "--isolate", "step", "--only", "environment,matmul", env=env, timeout=300)
    env_rec, mm = res["steps"]["environment"], res["steps"]["matmul"]
    assert env_rec["status"] == "failed" and "exited with code 3" in env_rec["error"]
    assert "GPU_CHECK_CRASH" in env_rec["output_tail"]
    assert mm["status"] == "ok" and _positive(mm["tflops"]["float32"])
    assert res["summary"]["failed"] == ["environment"] and res["summary"]["ok"] == ["matmul"]
    assert "Environment step: **failed**: the step's process exited with code 3" \
        in _gpu_check().render_markdown(res)


def test_render_markdown_reports_failed_and_skipped_steps():
    """The README section from a JSON with a failed, a skipped and a partly measured step (no torch needed)."""
    gc = _gpu_check()
    res = {"mode": "gpu", "started_utc": "2026-01-01 00:00:00", "wall_s": 400.0, "budget_s": 465.0,
           "command": "bash bench/gpu_check.sh",
           "steps": {
               "environment": {"status": "ok", "device": {"name": "NVIDIA H200"}, "driver": "580.1",
                               "torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0", "git": "abc1234",
                               "build": "pip editable install (40 s)"},
               "gpu_tests": {"status": "failed", "error": "RuntimeError: boom\nmore"},
               "agreement": {"status": "skipped", "reason": "time budget: 3 s left"},
               "matmul": {"status": "ok", "n": 8192, "tflops": {"float32": 50.0, "tf32": 400.0, "bfloat16": 780.0}},
               "grid": {"status": "ok", "N": 1281167, "D": 2048, "K": 1000, "M": 200, "heads": 27, "configs": [
                   {"features_dtype": "float32", "precision": "ieee", "matmul_mode": "float32", "epoch_s": 1.5,
                    "setup_s": 0.5, "extrapolated_30_epochs_s": 45.5, "needed_tflops": 20.0,
                    "measured": "2 full epoch(s) of N=1,281,167"},
                   {"features_dtype": "bfloat16", "precision": "tf32", "matmul_mode": "tf32",
                    "error": "OutOfMemoryError: CUDA out of memory"}]},
               "extraction": {"status": "skipped", "reason": "time budget: 0 s left"}}}
    md = gc.render_markdown(gc.finalize(res))
    assert res["steps"]["grid"]["configs"][0]["pct_of_matmul"] == 40.0      # 20 of 50 TFLOP/s
    assert "NVIDIA H200, driver 580.1, torch 2.11.0, CUDA 13.0, triton 3.6.0" in md
    assert "**failed**: RuntimeError: boom |" in md and "skipped: time budget: 3 s left" in md
    assert "30 epochs: **45.5 s**" in md and "= 40% of float32 matmul" in md
    assert "**not measured**: OutOfMemoryError" in md
    assert "float32 50, tf32 400, bfloat16 780 TFLOP/s (8192³)" in md
    assert res["summary"]["grid_under_target"] == {"float32/ieee": True}
    assert res["summary"]["failed"] == ["gpu_tests"] and res["summary"]["skipped"] == ["agreement", "extraction"]
