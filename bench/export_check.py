"""Real clients load our exports: compressed-tensors, GGUF and HF files of compressed SmolLM2-135M.

For each recipe: compress (in this run), save as a modelpress folder, export from that folder, then
read every export back with other people's code and compare with our own dequantised model:

* compressed-tensors: the library's own compressors decompress each layer (max |Δw|), and
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads the folder (logits vs ours);
* GGUF: ``gguf.GGUFReader`` + ``gguf.quants.dequantize`` tensor by tensor, ``from_pretrained(...,
  gguf_file=...)`` logits, and llama.cpp's own logits on the file (``bench/peers/llamacpp.py``:
  llama-cpp-python if installed, else the prebuilt library ``bash bench/setup_llamacpp.sh`` unpacks;
  cosine of the logits on the prompt);
* HF: ``from_pretrained`` logits.

    python bench/export_check.py --out bench/results/export_check
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", HERE.parents[1] / "shared")) / "data"

#: recipe -> GGUF exports (type, float type, on-unsupported)
GGUF_PLAN = {
    "rtn-w4-g64": [("Q4_0", "F32", "refuse"), ("Q4_K", "F16", "requantize"), ("Q6_K", "F16", "requantize")],
    "gptq-w4-g64": [("Q4_0", "F32", "refuse"), ("Q4_1", "F16", "refuse")],
    "rtn-w8": [("Q8_0", "F32", "refuse")],
    "rtn-w4-g32": [("Q4_0", "F16", "refuse")],
}


def logit_stats(theirs: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    """Max relative error (max |Δ| / max |ours|), min/mean cosine per position, top-1 agreement."""
    theirs, ours = theirs.double().reshape(-1, ours.shape[-1]), ours.double().reshape(-1, ours.shape[-1])
    cos = torch.nn.functional.cosine_similarity(theirs, ours, dim=-1)
    return {"max_rel_err": float((theirs - ours).abs().max() / ours.abs().max()), "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean()),
            "cos_p10": float(torch.quantile(cos.double().flatten(), 0.1)), "top1_agree": float((theirs.argmax(-1) == ours.argmax(-1)).double().mean())}


def folder_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def check_ct(folder: Path, out: Path, lm: Any, ids: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from modelpress.export.export import export

    t = time.perf_counter()
    rep = export(str(folder), "compressed-tensors", out)
    row: dict[str, Any] = {"target": "compressed-tensors", "export_s": time.perf_counter() - t,
                           "size_bytes": folder_bytes(out), "counts": rep.counts()}
    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    sd, worst = load_file(str(out / "model.safetensors")), 0.0
    for scheme in qcfg.config_groups.values():
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            own["weight_scale"] = own["weight_scale"].float()
            w = comp.decompress(own, scheme)["weight"].float()
            worst = max(worst, float((w - lm.module.get_submodule(name).dequantized_weight()).abs().max()))
    row["library_decompress_max_abs_dw"] = worst
    row["format"] = qcfg.format
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        row["transformers"] = logit_stats(ref(input_ids=ids).logits, ours)
    del ref
    return row


def check_gguf(folder: Path, out: Path, lm: Any, ids: torch.Tensor, ours: torch.Tensor, gtype: str, ftype: str,
               policy: str) -> dict[str, Any]:
    from modelpress.export.export import export

    t = time.perf_counter()
    rep = export(str(folder), "gguf", out, gguf_type=gtype, float_type=ftype, on_unsupported=policy)
    row: dict[str, Any] = {"target": f"gguf {gtype} (float tensors {ftype}, {policy})", "export_s": time.perf_counter() - t,
                           "size_bytes": folder_bytes(out), "counts": rep.counts(),
                           "types": sorted({r.target for r in rep.tensors})}
    row.update(gguf_reader_check(out, lm, rep))
    theirs, emulated = gguf_logits(out, ids, gtype, ftype)
    row["transformers"] = logit_stats(theirs, ours)
    row["llama_cpp"] = llama_cpp_check(out, ids, ours, emulated)
    return row


@torch.no_grad()
def gguf_logits(path: Path, ids: torch.Tensor, gtype: str, ftype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits on a GGUF file, plain and with llama.cpp's activation rounding (see
    :func:`llamacpp_rounding`)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    plain = ref(input_ids=ids).logits
    with llamacpp_rounding(ref, gtype, ftype):
        emulated = ref(input_ids=ids).logits
    return plain, emulated


def round_q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x through llama.cpp's ``quantize_row_q8_0``/``q8_1`` and back: blocks of 32 along the last axis,
    ``d = amax / 127`` (kept as fp16), ``q = roundf(x / d)`` (halves away from zero)."""
    xb = x.reshape(*x.shape[:-1], -1, 32).float()
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = xb * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def llamacpp_rounding(model: torch.nn.Module, gtype: str, ftype: str) -> Iterator[None]:
    """Inside: every linear rounds its input the way llama.cpp's CPU matmul does for its weight type.

    Q4_0 / Q4_1 / Q8_0 weights are multiplied with activations quantised to 8 bits per block of 32
    (Q8_0 / Q8_1); an F16 weight (the tied LM head of an F16-float file) with activations cast to
    fp16; F32 weights with fp32 activations. This isolates what llama.cpp's arithmetic, not our file,
    changes in the logits (K/V caches in fp16 and the attention kernels are left out).
    """
    def hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., tuple[torch.Tensor]]:
        return lambda _m, args: (fn(args[0]),) + tuple(args[1:])

    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if name.endswith("lm_head"):
            if ftype == "F16":
                handles.append(mod.register_forward_pre_hook(hook(lambda x: x.half().float())))
        elif gtype in ("Q4_0", "Q4_1", "Q8_0") and mod.in_features % 32 == 0:
            handles.append(mod.register_forward_pre_hook(hook(round_q8_blocks)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gguf_reader_check(path: Path, lm: Any, rep: Any) -> dict[str, Any]:
    """Dequantise every tensor with gguf-py and compare with our weight (rotary rows restored)."""
    import gguf

    from modelpress.export.writers.gguf import _permute_rotary

    cfg = lm.module.config
    ours = _our_tensors(lm, cfg)
    actions = {r.name: r.action for r in rep.tensors}
    lossless_max, rel_rms = 0.0, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        w = ours[t.name]
        if arr.ndim == 2:
            w = _permute_rotary(w, _hf_suffix(t.name), cfg)
        if actions[t.name] in ("lossless", "copied"):
            lossless_max = max(lossless_max, float(np.abs(arr - w).max()))
        else:
            rel_rms[t.name] = float(np.sqrt(((arr - w) ** 2).mean()) / (np.sqrt((w ** 2).mean()) + 1e-30))
    worst = max(rel_rms.items(), key=lambda kv: kv[1]) if rel_rms else None
    return {"reader_lossless_max_abs_dw": lossless_max, "reader_other_tensors": len(rel_rms),
            "reader_other_worst_rel_rms": worst}


def _hf_suffix(gguf_name: str) -> str:
    return {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight"}.get(
        gguf_name.split(".", 2)[-1], gguf_name)


def _our_tensors(lm: Any, cfg: Any) -> dict[str, np.ndarray]:
    import gguf

    from modelpress.export.writers.gguf import _weights

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for hf, src in _weights(lm.module):
        w = src if isinstance(src, torch.Tensor) else src.dequantized_weight()
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g:
            out[g] = w.detach().float().numpy()
    return out


def llama_cpp_check(path: Path, ids: torch.Tensor, ours: torch.Tensor,
                    emulated: torch.Tensor | None = None) -> dict[str, Any]:
    """llama.cpp's own logits on our GGUF (``bench/peers/llamacpp.py``: llama-cpp-python or the prebuilt library),
    against ours and, when given, against ours with llama.cpp's activation rounding."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers.llamacpp import open_llamacpp

    peer, why = open_llamacpp(str(path), n_threads=2, n_ctx=max(256, ids.shape[1] + 8))
    if peer is None:
        return {"status": f"not available ({why})"}
    theirs = torch.from_numpy(peer.logits(ids[0].tolist()))
    del peer
    row = {"status": "ok", **logit_stats(theirs, ours)}
    if emulated is not None:
        row["vs_emulated"] = logit_stats(theirs, emulated)
        row["emulated_vs_ours"] = logit_stats(emulated, ours)
    return row


def check_foreign_gguf(path: Path, ids: torch.Tensor) -> dict[str, Any]:
    """The same comparison on a GGUF file we did not write (the bundled SmolLM2 Q4_1): transformers'
    reading of it stands in for "ours". Its agreement with llama.cpp is the yardstick for our files:
    what two correct runtimes reach on one file, with llama.cpp's own arithmetic."""
    theirs, emulated = gguf_logits(path, ids, "Q4_1", "F32")
    return {"recipe": "(not ours) bundled GGUF", "target": f"gguf {path.name}", "size_bytes": path.stat().st_size,
            "counts": {"as published": 1}, "transformers": {"max_rel_err": 0.0, "cos_min": 1.0},
            "llama_cpp": llama_cpp_check(path, ids, theirs, emulated)}


def check_hf(folder: Path, out: Path, ids: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from modelpress.export.export import export

    t = time.perf_counter()
    rep = export(str(folder), "hf", out)
    row = {"target": "hf (float32)", "export_s": time.perf_counter() - t, "size_bytes": folder_bytes(out),
           "counts": rep.counts()}
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        row["transformers"] = logit_stats(ref(input_ids=ids).logits, ours)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipes", nargs="+", default=["rtn-w4-g64", "rtn-w8", "gptq-w4-g64"])
    ap.add_argument("--prompt-data", default=str(SHARED / "wikitext2/wiki.test.raw"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.eval.perplexity import read_text

    base = mp.load(args.model)
    ids = torch.tensor([base.tokenizer.encode(read_text(args.prompt_data, True))[: args.prompt_tokens]])
    calib = mp.calibration_for(base, args.calib, args.calib_samples, args.calib_seq_len)
    meta = {k: getattr(args, k) for k in ("model", "prompt_tokens", "calib_samples", "calib_seq_len", "threads")}
    meta.update(torch=torch.__version__, cpus=os.cpu_count(), machine="2-core shared CPU box")
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="mp-export-check-"))
    for recipe in args.recipes:
        lm = mp.load(copy.deepcopy(base.module))
        lm.tokenizer, lm.add_bos, lm.source = base.tokenizer, base.add_bos, base.source
        t = time.perf_counter()
        mp.compress(lm, recipe, calib=calib, progress=False)
        compress_s = time.perf_counter() - t
        folder = mp.save(lm, work / recipe, recipe=recipe)
        with torch.no_grad():
            ours = lm.module(input_ids=ids).logits
        rows = [check_ct(folder, work / f"{recipe}-ct", lm, ids, ours)]
        for gtype, ftype, policy in GGUF_PLAN.get(recipe, [("Q4_0", "F16", "requantize")]):
            rows.append(check_gguf(folder, work / f"{recipe}-{gtype}-{ftype}.gguf", lm, ids, ours, gtype, ftype, policy))
        rows.append(check_hf(folder, work / f"{recipe}-hf", ids, ours))
        for r in rows:
            r.update(recipe=recipe, compress_s=compress_s, modelpress_bytes=folder_bytes(folder))
            print(json.dumps(r, default=str), flush=True)
        results.extend(rows)
        write(args.out, meta, results)
        del lm
    if args.model.startswith("bundled:"):
        from modelpress.models.loading import resolve_bundled

        results.append(check_foreign_gguf(resolve_bundled(args.model), ids))
        print(json.dumps(results[-1], default=str), flush=True)
        write(args.out, meta, results)


def write(out: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [f"# Exports read back by real clients ({meta['model']}, prompt of {meta['prompt_tokens']} WikiText-2 tokens)",
             "", "Logits compared with our own dequantised model on the same ids: max rel err = max |Δ| / max |ours|; "
             "cos = cosine per position (min). `lossless max |Δw|`: tensors carried code for code, read back by "
             "the target's own decoder (compressed-tensors compressors / gguf-py).", "",
             "llama.cpp columns: cosine per position (min / 10th percentile / mean) and top-1 agreement against ours, "
             "then the min "
             "cosine against ours run with llama.cpp's activation rounding (8-bit blocks of 32 into Q4/Q8 matmuls, "
             "fp16 into an F16 LM head), which shows the size of what 8-bit activations alone do. The last row is a file we did not write (the "
             "bundled GGUF, transformers' reading of it in place of ours): the agreement two correct runtimes reach.",
             "",
             "| recipe | target | tensors | size MiB | lossless max abs dw | transformers max rel err | transformers cos min "
             "| llama.cpp cos min / 10th pct / mean / top-1 | llama.cpp vs ours+A8 rounding, cos min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = r.get("transformers", {})
        lc = r.get("llama_cpp")
        ok = lc is not None and lc.get("status") == "ok"
        lcs = "n/a" if lc is None else (f"{lc['cos_min']:.5f} / {lc['cos_p10']:.5f} / {lc['cos_mean']:.5f} / {lc['top1_agree']:.3f}" if ok
                                         else lc["status"][:40])
        emu = f"{lc['vs_emulated']['cos_min']:.5f}" if ok and "vs_emulated" in lc else "n/a"
        dw = r.get("library_decompress_max_abs_dw", r.get("reader_lossless_max_abs_dw"))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items()))
        lines.append(f"| {r['recipe']} | {r['target']} | {counts} | {r['size_bytes'] / 2**20:.1f} | "
                     f"{'' if dw is None else f'{dw:.3g}'} | {tr.get('max_rel_err', float('nan')):.2e} | "
                     f"{tr.get('cos_min', float('nan')):.6f} | {lcs} | {emu} |")
    others = [(r["recipe"], r["target"], r["reader_other_worst_rel_rms"]) for r in rows if r.get("reader_other_worst_rel_rms")]
    if others:
        lines += ["", "Re-quantised / cast GGUF tensors, worst relative RMS error against our weight (gguf-py reader):", ""]
        lines += [f"- {a} {b}: {c[0]} {c[1]:.4f}" for a, b, c in others]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
