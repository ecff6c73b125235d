#!/usr/bin/env bash
# Packaging check (run by .ci/run after the tests): build an sdist and a wheel, install the wheel into a second,
# clean venv letting pip resolve its declared dependencies (the constraints file keeps the torch build), run
# `pip check`, import every module, and run the CPU-backend tests against the installed wheel with the kernels'
# run-time dispatch forced to the lowest level. An undeclared dependency or a module missing from the wheel
# fails here, not on a user's machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${IIS_FAST_WHEEL_DIR:-$(mktemp -d)}
VENV2="$OUT/venv"
t0=$(date +%s)

echo "[wheel] building sdist and wheel"
rm -rf "$OUT/dist"
.venv/bin/python -m build -q --sdist --wheel --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
ls "$OUT/dist"
whl=$(ls "$OUT"/dist/*.whl)
# nothing but iis_fast at the top level of the wheel
top=$(.venv/bin/python -c "import sys, zipfile; print(sorted({n.split('/')[0] for n in zipfile.ZipFile(sys.argv[1]).namelist() if not n.split('/')[0].endswith('.dist-info')}))" "$whl")
[ "$top" = "['iis_fast']" ] || { echo "[wheel] unexpected top-level entries: $top" >&2; exit 1; }

echo "[wheel] installing into a clean venv (pip resolves the declared dependencies)"
rm -rf "$VENV2"
"$ROOT/.venv/bin/python" -c "import sys; print(sys._base_executable)" >/dev/null
BASE_PY=$("$ROOT/.venv/bin/python" -c "import sys; print(sys._base_executable)")
"$BASE_PY" -m venv "$VENV2"
"$VENV2/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt "$whl[all]"
"$VENV2/bin/python" -m pip check

cd "$OUT"                          # away from the source tree: everything below uses the installed wheel
echo "[wheel] importing every module"
"$VENV2/bin/python" - <<'PY'
import importlib, pkgutil, iis_fast
assert "site-packages" in iis_fast.__file__, iis_fast.__file__
names = [m.name for m in pkgutil.walk_packages(iis_fast.__path__, "iis_fast.")
         if not m.name.startswith("iis_fast._C_") and m.name != "iis_fast.__main__"]
for n in names:
    importlib.import_module(n)
try:
    import kernels  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("a top-level 'kernels' package is importable from the wheel")
print(f"[wheel] imported {len(names)} modules from {iis_fast.__file__}")
PY
"$VENV2/bin/iis-fast" --version

echo "[wheel] CPU-backend tests, kernels forced to the lowest level"
rm -rf "$OUT/tests" && cp -r "$ROOT/tests" "$OUT/tests"
IIS_FAST_CPU_LEVEL=base "$VENV2/bin/python" -c \
  "from iis_fast.backends.cpp import CPU_LEVEL, _C; assert CPU_LEVEL == 'base' and _C is not None, CPU_LEVEL; print('[wheel] kernels:', _C.__name__)"
IIS_FAST_CPU_LEVEL=base IIS_FAST_WEIGHTS="$ROOT/.venv/share/iis_fast/weights" \
  "$VENV2/bin/python" -m pytest -q -p no:cacheprovider -p no:warnings --rootdir "$OUT" \
  "$OUT/tests/test_cpp_backend.py" "$OUT/tests/test_heads.py"
echo "[wheel] ok in $(( $(date +%s) - t0 )) s"
