#!/bin/sh
# Build llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) from the llama.cpp
# that the llama-cpp-python 0.3.36 sdist vendors: the consumer tests that need them (tests/test_imatrix.py, validate.speed,
# `pytest -m llama_cpp`) find them through QUANTFAB_LLAMA_CPP_TOOLS. About 10 minutes on 2 cores.
#   sh bench/consumers/build_llama_cpp_tools.sh [destination, default ../llama-cpp-tools]
set -eu
dest=$(mkdir -p "${1:-../llama-cpp-tools}" && cd "${1:-../llama-cpp-tools}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$work" >/dev/null
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
src="$work/llama_cpp_python-0.3.36/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$work/build" --target llama-quantize llama-imatrix llama-perplexity llama-bench -j "$(nproc)"
cp "$work"/build/bin/llama-quantize "$work"/build/bin/llama-imatrix "$work"/build/bin/llama-perplexity "$work"/build/bin/llama-bench "$dest"/
echo "built into $dest: export QUANTFAB_LLAMA_CPP_TOOLS=$dest"
