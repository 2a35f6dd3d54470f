#!/usr/bin/env bash
# Build Horovod 0.28.1 (the latest release) for the checkout's .venv and install it.
#
#   docker/install_horovod.sh            # or: make horovod
#
# Horovod 0.28.1 compiles against torch 2.13 only as C++17, but its CMake files ask for C++14, so
# `pip install horovod` fails. This script downloads the sdist from PyPI, switches both CMake
# files to C++17, and builds a wheel with PyTorch, MPI (the venv's MPICH) and Gloo support. The
# wheel is kept in a cache folder (DASO_WHEEL_CACHE, default ~/.cache/daso/wheels/<python>-<torch>)
# and reused on the next run, so only the first build takes minutes (about 2.5 on 2 cores).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$here/.venv}
py=$venv/bin/python
version=0.28.1
[[ -x $py ]] || { echo "no $py: run 'make install' first" >&2; exit 2; }
if "$py" -c "import horovod.torch" 2>/dev/null; then
  echo "horovod $("$py" -c 'import horovod; print(horovod.__version__)') is already installed"
  exit 0
fi
tag=$("$py" -c 'import sys, torch; v = sys.version_info; print(f"cp{v[0]}{v[1]}-torch" + torch.__version__.split("+")[0])')
cache=${DASO_WHEEL_CACHE:-$HOME/.cache/daso/wheels}/$tag
mkdir -p "$cache"
wheel=$(ls "$cache"/horovod-$version-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z $wheel ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$py" -m pip download --quiet --no-deps --no-binary :all: "horovod==$version" -d "$work"
  tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
  src=$work/horovod-$version
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" \
    "$src/horovod/torch/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD 17" "$src/horovod/torch/CMakeLists.txt"
  # CMake 4 refuses the bundled gloo's cmake_minimum_required; 3.x builds it as released
  "$py" -m pip install --quiet "setuptools<81" wheel "cmake<4" psutil pyyaml cloudpickle packaging
  echo "building horovod $version (a few minutes)..." >&2
  PATH=$venv/bin:$PATH HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    "$py" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" "$src"
  cp "$work"/dist/horovod-$version-*.whl "$cache/"
  wheel=$(ls "$cache"/horovod-$version-*.whl | head -n 1)
fi
"$py" -m pip install --quiet "$wheel"
"$py" -c "import horovod.torch as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'mpi built:', hvd.mpi_built(), 'gloo built:', hvd.gloo_built())"
