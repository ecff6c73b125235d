#!/usr/bin/env bash
# The one command for a lent GPU machine (docs/gpu.md), run from the repository root of a bare copy:
#
#   bash bench/gpu_check.sh            # build the C++ kernels with the pybind11 found, then bench/gpu_check.py
#   bash bench/gpu_check.sh --dry-run  # the same on a CPU machine at tiny sizes (extra arguments go to gpu_check.py)
#
# Uses the machine's python3 (a project .venv is used only where one exists: it does not travel to the device).
# Results go to $OUT (gpu_check.json, gpu_check.md, gpu_check.log) when $OUT is set, else to bench/results/.
# The whole run, build included, is held to 8 minutes: gpu_check.py gets the deadline and skips what no longer fits.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
LOGDIR=${OUT:-bench/results}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_check.log"
: >"$LOG"
say() { echo "[gpu_check.sh] $*" | tee -a "$LOG" >&2; }  # stderr: build() prints only its method

built() {  # the C++ kernels import and iis_fast.kernels (the Triton package, kernels/) resolves
  "$PY" -c "from iis_fast.backends.cpp import _C; assert _C is not None; import importlib.util as u; \
assert u.find_spec('iis_fast.kernels')" >/dev/null 2>&1
}

build() {
  if built; then echo "already built"; return 0; fi
  # build_ext -j builds both CPU levels in parallel and installs nothing into the machine's python
  say "setup.py build_ext --inplace -j 4"
  if timeout 300 "$PY" setup.py -q build_ext --inplace -j 4 >>"$LOG" 2>&1; then
    # without an install, iis_fast.kernels (installed from kernels/) needs a link inside the package
    "$PY" -c "import importlib.util as u; assert u.find_spec('iis_fast.kernels')" 2>/dev/null \
      || { [ -e iis_fast/kernels ] || ln -s ../kernels iis_fast/kernels; }
    if built; then echo "setup.py build_ext --inplace"; return 0; fi
  fi
  say "build_ext failed; trying pip install --no-index --no-build-isolation --no-deps -e ."
  if timeout 300 "$PY" -m pip install -q --no-index --no-build-isolation --no-deps --disable-pip-version-check -e . \
      >>"$LOG" 2>&1 && built; then echo "pip editable install"; return 0; fi
  say "pip failed; compiling csrc/grid.cpp directly with g++"
  local inc suffix
  inc=$("$PY" -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])") || return 1
  suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))") || return 1
  local flags="-O3 -ffp-contract=off -fno-math-errno -fopenmp -shared -fPIC -std=c++17"
  g++ $flags -march=x86-64-v3 $(printf -- '-I%s ' $inc) -DIIS_FAST_MODULE=_C_avx2 csrc/grid.cpp \
      -o "iis_fast/_C_avx2$suffix" >>"$LOG" 2>&1 &
  g++ $flags -march=x86-64 -mtune=generic $(printf -- '-I%s ' $inc) -DIIS_FAST_MODULE=_C_base csrc/grid.cpp \
      -o "iis_fast/_C_base$suffix" >>"$LOG" 2>&1 &
  wait
  [ -e iis_fast/kernels ] || ln -s ../kernels iis_fast/kernels
  if built; then echo "g++ directly"; return 0; fi
  return 1
}

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
B0=$(date +%s)
if METHOD=$(build); then
  export GPU_CHECK_BUILD="$METHOD ($(( $(date +%s) - B0 )) s)"
else
  export GPU_CHECK_BUILD="FAILED after $(( $(date +%s) - B0 )) s: the cpp backend is missing (see gpu_check.log)"
  # iis_fast.kernels must still resolve for the Triton steps
  "$PY" -c "import importlib.util as u; assert u.find_spec('iis_fast.kernels')" 2>/dev/null \
    || { [ -e iis_fast/kernels ] || ln -s ../kernels iis_fast/kernels; }
fi
say "build: $GPU_CHECK_BUILD"
export GPU_CHECK_COMMAND="bash bench/gpu_check.sh${*:+ $*}"
"$PY" bench/gpu_check.py --deadline $(( START + 470 )) "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
