#!/usr/bin/env bash
# The C++ (libtorch) side: build libfast_attn with CMake, run ctest, install it
# with its package config, then build and run examples/cpp against the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=${1:-$(mktemp -d)}
torch_prefix=$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_INSTALL_PREFIX="$work/install"
cmake --build "$work/build" -j "$(nproc)"
ctest --test-dir "$work/build" --output-on-failure
cmake --install "$work/build"
cmake -S examples/cpp -B "$work/example" -G Ninja -DCMAKE_PREFIX_PATH="$work/install;$torch_prefix"
cmake --build "$work/example"
"$work/example/attention_example"
