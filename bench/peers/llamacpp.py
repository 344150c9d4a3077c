"""llama.cpp as a peer, through its C API: ``llama-cpp-python`` when it is installed, else the
prebuilt CPU library of the ``llama-cpp-cffi`` wheel that ``bench/setup_llamacpp.sh`` unpacks.

Why two routes: ``llama-cpp-python`` ships only a source distribution on PyPI (a ~12+ minute
build here), while ``llama-cpp-cffi`` ships a compiled llama.cpp (AVX2, llamafile kernels) whose
Python layer pins ``transformers<5``. We use neither's high-level layer: only llama.cpp's own
functions (load, decode, logits), so what is measured is llama.cpp itself.

    peer = open_llamacpp("model.gguf", n_threads=2, n_ctx=512)
    logits = peer.logits([1, 2, 3])          # (3, vocab) float32, one row per position
    tok_s = peer.decode_tokens_per_s(prompt_ids, 128)
"""
from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

LIB_DIR = Path(os.environ.get("MODELPRESS_LLAMACPP_DIR", Path(__file__).resolve().parent / ".llamacpp"))


class LlamaCppPeer(Protocol):
    version: str

    def logits(self, ids: list[int]) -> np.ndarray: ...

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float: ...


class _CffiLlama:
    """llama.cpp via the compiled ``_llama_cpp_cpu`` cffi module (the C API, nothing above it)."""

    def __init__(self, model_path: str, n_threads: int, n_ctx: int) -> None:
        ctypes.CDLL(str(LIB_DIR / "libcxa_shim.so"), mode=ctypes.RTLD_GLOBAL)  # wheel built on GCC 14
        sys.path.insert(0, str(LIB_DIR))
        import _llama_cpp_cpu as m  # type: ignore[import-not-found]

        self.lib, self.ffi = m.lib, m.ffi
        self.lib.llama_backend_init()
        self._quiet()
        mp = self.lib.llama_model_default_params()
        self.model = self.lib.llama_model_load_from_file(str(model_path).encode(), mp)
        if self.model == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        cp = self.lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads = cp.n_threads_batch = n_threads
        self.ctx = self.lib.llama_init_from_model(self.model, cp)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self.version = "llama.cpp C API from llama-cpp-cffi 0.4.42 (CPU build)"

    def _quiet(self) -> None:
        """Drop llama.cpp's per-load log lines (the callback must outlive the calls)."""
        try:
            self._log_cb = self.ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *a: None)
            self.lib.llama_log_set(self._log_cb, self.ffi.NULL)
        except Exception:  # an API without the hook: logs go to stderr, nothing else changes
            pass

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        n = len(ids)
        batch = self.lib.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            self.lib.llama_batch_free(batch)

    def _row(self, i: int) -> np.ndarray:
        p = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.frombuffer(self.ffi.buffer(p, 4 * self.n_vocab), dtype=np.float32).copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        self.lib.llama_kv_self_clear(self.ctx)
        self._decode(ids, 0, all_logits=True)
        return np.stack([self._row(i) for i in range(len(ids))])

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float:
        """Greedy decoding of ``new_tokens`` tokens after the prompt; EOS is not special (no early stop)."""
        self.lib.llama_kv_self_clear(self.ctx)
        self._decode(prompt, 0, all_logits=False)
        tok = int(self._row(-1).argmax())
        t = time.perf_counter()
        for k in range(new_tokens):
            self._decode([tok], len(prompt) + k, all_logits=False)
            tok = int(self._row(-1).argmax())
        return new_tokens / (time.perf_counter() - t)


class _PyLlama:
    """llama.cpp via ``llama-cpp-python`` (same measurements as :class:`_CffiLlama`)."""

    def __init__(self, model_path: str, n_threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(model_path), n_threads=n_threads, n_ctx=n_ctx,
                                   logits_all=True, verbose=False)
        self.version = f"llama-cpp-python {llama_cpp.__version__}"

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        tok = int(np.argmax(self.llm.scores[len(prompt) - 1]))
        t = time.perf_counter()
        for k in range(new_tokens):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[len(prompt) + k]))
        return new_tokens / (time.perf_counter() - t)


def open_llamacpp(model_path: str, n_threads: int = 2, n_ctx: int = 512) -> tuple[Any, str | None]:
    """``(peer, None)``, or ``(None, why not)`` when neither route is available here."""
    try:
        return _PyLlama(model_path, n_threads, n_ctx), None
    except ImportError:
        pass
    if not (LIB_DIR / "_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so").exists():
        return None, f"llama_cpp not importable and no prebuilt library in {LIB_DIR} (run bash bench/setup_llamacpp.sh)"
    try:
        return _CffiLlama(model_path, n_threads, n_ctx), None
    except Exception as e:  # report, do not crash the benchmark
        return None, f"prebuilt llama.cpp failed: {e}"
