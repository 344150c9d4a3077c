#!/usr/bin/env bash
# Unpacks a prebuilt llama.cpp (CPU, AVX2) for the benchmarks' peer rows, without building it.
# llama-cpp-python is source-only on PyPI (~12+ min build on 2 cores); the llama-cpp-cffi wheel
# carries a compiled llama.cpp. Only its CPU library is kept; its Python layer (which pins
# transformers<5) is not installed. The library was linked against GCC 14's libstdc++ and needs
# one symbol Debian 12's lacks (__cxa_call_terminate): a two-line shim provides it.
# Usage: bash bench/setup_llamacpp.sh [DIR]   (default: bench/peers/.llamacpp, git-ignored)
set -euo pipefail
D="${1:-$(dirname "$0")/peers/.llamacpp}"
mkdir -p "$D"
T="$(mktemp -d)"
pip download -q --no-deps --only-binary :all: -d "$T" "llama-cpp-cffi==0.4.42"
python3 - "$T" "$D" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llama_cpp_cffi-*.whl")[0]
name = "llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so"
with zipfile.ZipFile(whl) as z, open(sys.argv[2] + "/" + name.split("/")[1], "wb") as f:
    f.write(z.read(name))
PY
printf '#include <exception>\nextern "C" void __cxa_call_terminate(void*) noexcept { std::terminate(); }\n' > "$T/shim.cc"
g++ -O2 -shared -fPIC "$T/shim.cc" -o "$D/libcxa_shim.so"
python3 -c "import cffi" 2>/dev/null || pip install -q cffi
rm -rf "$T"
echo "llama.cpp CPU library in $D"
