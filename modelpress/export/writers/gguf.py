"""GGUF writer for llama.cpp (Llama-family models), written with the ``gguf`` package.

Every weight gets the requested GGML type (``--gguf-type``): a quantised layer whose grid matches
the type's blocks exactly is carried over code for code (see :mod:`..codecs.gguf_blocks`). A
compressed layer the type cannot hold (another grid, NF4, FP8, a K-quant, an activation-quantised
layer class) or whose rows the type's blocks do not tile is listed and refused, written as F16
(``dequantize``) or quantised from our dequantised weight (``requantize``), as
``--on-unsupported`` says; ``--gguf-type F32``/``F16`` asks for dequantised weights outright. Float
tensors that modelpress left alone (embeddings, an untied head) use ``float_type`` (F16 by
default, or ``same`` for the requested type); norms and biases are F32. ``q_proj`` / ``k_proj``
rows are permuted into llama.cpp's rotary layout as ``convert_hf_to_gguf.py`` does (a row
permutation, so quantised rows move whole). Tokenizer metadata comes from the source GGUF when
the model came from one, from a llama2.c tokenizer as llama.cpp's SentencePiece (``llama``)
vocabulary, otherwise from the HF tokenizer through gguf-py's vocab helpers.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...core.errors import ModelpressError
from ...models.loading import LoadedModel, resolve_bundled
from ...models.tokenizers import Llama2cTextTokenizer
from ...quant.qlinear import QuantLinear
from ..codecs.gguf_blocks import KQUANT_FALLBACK, GGUFCodec, codec
from ..plan import ExportReport, OnUnsupported, dense_weight, describe_format, refuse_if_any
from . import WriterOption, register_writer, atomic_output

#: ``model_type`` values written with llama.cpp's ``llama`` architecture.
LLAMA_TYPES = ("llama",)
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}


@register_writer("gguf", summary="one .gguf file that llama.cpp loads", single_file=True, options=(
    WriterOption("gguf-type", f"GGUF tensor type for quantised weights: {' '.join(GGUF_TYPES)}", "Q4_0"),
    WriterOption("gguf-float-type", "GGUF type for tensors modelpress left in float (embeddings): a type or 'same'",
                 "F16", keyword="float_type")))
def write_gguf(lm: LoadedModel, output: str | Path, *, gguf_type: str = "Q4_0", float_type: str = "F16",
               on_unsupported: OnUnsupported = OnUnsupported.REFUSE, overwrite: bool = False, **_: Any) -> ExportReport:
    """Write ``lm`` as one ``.gguf`` file (and ``<output>.export.json`` with the per-tensor report).

    Example:
        >>> write_gguf(lm, "out/smol-q4_0.gguf", gguf_type="Q4_0")  # doctest: +SKIP
    """
    import gguf

    gguf_type, float_type = gguf_type.upper(), float_type.upper()
    if gguf_type not in GGUF_TYPES:
        raise ModelpressError(f"--gguf-type {gguf_type}: supported {', '.join(GGUF_TYPES)}")
    if float_type != "SAME" and float_type not in GGUF_TYPES:
        raise ModelpressError(f"--gguf-float-type {float_type}: supported same, {', '.join(GGUF_TYPES)}")
    cfg = _llama_config(lm)
    out = Path(output)
    if out.suffix != ".gguf":
        raise ModelpressError(f"GGUF output must be a .gguf file path, got {out}")
    report = ExportReport("gguf", str(out))
    tensors = _plan_tensors(lm, cfg, gguf_type, gguf_type if float_type == "SAME" else float_type, on_unsupported)
    report.notes += _policy_notes(tensors, gguf_type, on_unsupported)
    with atomic_output(out, overwrite, is_file=True) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(w, lm, cfg, gguf_type)
        report.notes.append(_add_tokenizer(w, lm))
        for t in tensors:
            data, rec = _encode(t, cfg)
            w.add_tensor(t["gguf_name"], data, raw_dtype=codec(rec["target"]).qtype() if data.dtype == np.uint8 else None)
            report.add(t["gguf_name"], rec["source"], rec["target"], rec["action"], rec.get("detail", ""))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    report.write(out.with_suffix(".export.json"))
    return report


def _llama_config(lm: LoadedModel) -> Any:
    cfg = getattr(lm.module, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in LLAMA_TYPES:
        raise ModelpressError(f"GGUF export has no mapping for architecture {mt or type(lm.module).__name__!r} "
                              f"(supported: {', '.join(LLAMA_TYPES)})")
    rs = getattr(cfg, "rope_scaling", None) or {}
    if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ModelpressError(f"GGUF export: rope scaling {rs.get('rope_type', rs.get('type'))!r} is not mapped yet")
    return cfg


# ---- which tensors, in which type ------------------------------------------------------------
def _plan_tensors(lm: LoadedModel, cfg: Any, qtype: str, ftype: str, policy: OnUnsupported) -> list[dict[str, Any]]:
    """One entry per GGUF tensor: HF name, GGUF name, source, target type and, for a layer carried
    over exactly, its bytes. Refuses, listing every layer ``qtype`` cannot hold, when ``policy`` is
    ``refuse``."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    plan, problems, unmapped = [], [], []
    for hf_name, src in _weights(lm.module):
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads the tied head from token_embd
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unmapped.append(hf_name)
            continue
        shape = _shape(src)
        want = "F32" if len(shape) == 1 else (ftype if isinstance(src, torch.Tensor) else qtype)
        carried, why = _carry(src, want, shape[-1])
        if why is not None:
            problems.append((hf_name, why))
        target = want if why is None else _fallback(want, shape[-1], policy)
        plan.append({"hf_name": hf_name, "gguf_name": gname, "src": src, "target": target, "why": why,
                     "carried": carried})
    if unmapped:
        raise ModelpressError(f"GGUF llama mapping has no name for: {', '.join(unmapped[:5])}")
    refuse_if_any(problems, f"GGUF {qtype} (holds exactly: {codec(qtype).carries})", policy)
    return plan


def _policy_notes(plan: list[dict[str, Any]], qtype: str, policy: OnUnsupported) -> list[str]:
    """What ``--on-unsupported`` did to the layers GGUF ``qtype`` cannot hold (none: no note)."""
    odd = [t for t in plan if t["why"]]
    if not odd:
        return []
    done = "quantised from our dequantised weight" if policy == OnUnsupported.REQUANTIZE else "written as float"
    listed = "; ".join(f"{t['hf_name']}: {t['why']} -> {t['target']}" for t in odd[:3])
    more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
    return [f"--on-unsupported {policy.value}: {len(odd)} tensor(s) GGUF {qtype} cannot hold were {done}: "
            f"{listed}{more}"]


def _carry(src: nn.Module | torch.Tensor, want: str, width: int) -> tuple[tuple[np.ndarray, float] | None, str | None]:
    """``(exact bytes, rounding)`` of a layer ``want`` holds code for code, or why ``want`` cannot hold it.

    ``(None, None)``: nothing to refuse (a float weight, or a dequantised one because ``want`` is float).
    """
    c = codec(want)
    if not c.fits(width):
        return None, f"{want} needs rows in multiples of {c.block}, this one has {width}"
    if isinstance(src, torch.Tensor) or want in ("F32", "F16"):
        return None, None
    if isinstance(src, QuantLinear):
        carried = c.carry(src.qtensor())
        return (carried, None) if carried is not None else (None, f"{describe_format(src)} is not on {want}'s grid")
    if getattr(src, "layer_tag", None) == "sparse" and src.is_compressed_linear:
        return None, None  # float weights with zeros: quantised like any float weight
    return None, f"modelpress layer {src.layer_tag!r} has no GGUF encoding"


def _fallback(want: str, width: int, policy: OnUnsupported) -> str:
    """Type for a layer ``want`` cannot hold: F16 (``dequantize``), else ``want`` itself or, where its blocks
    do not tile the row, llama.cpp's own fallback (``requantize``)."""
    if policy != OnUnsupported.REQUANTIZE:
        return "F16"
    fb = want if codec(want).fits(width) else KQUANT_FALLBACK.get(want, "F16")
    return fb if codec(fb).fits(width) else "F16"


def _weights(model: nn.Module) -> list[tuple[str, nn.Module | torch.Tensor]]:
    """(HF tensor name, QuantLinear / compressed layer / float tensor) for every weight and bias."""
    out: list[tuple[str, nn.Module | torch.Tensor]] = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, QuantLinear) or getattr(m, "layer_tag", None):
            if name and _inside_compressed(model, name):
                continue  # a low-rank layer's quantised factor: part of its parent's weight
            out.append((f"{pre}weight", m))
            if getattr(m, "bias", None) is not None:
                out.append((f"{pre}bias", m.bias.detach()))
            continue
        for pname, p in m.named_parameters(recurse=False):
            if not _inside_compressed(model, name):
                out.append((f"{pre}{pname}", p.detach()))
    return out


def _inside_compressed(model: nn.Module, name: str) -> bool:
    """True for submodules of a compressed layer class (their parameters belong to that layer)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(m, QuantLinear) or getattr(m, "layer_tag", None):
            return True
    return False


def _shape(src: nn.Module | torch.Tensor) -> tuple[int, ...]:
    if isinstance(src, torch.Tensor):
        return tuple(src.shape)
    if isinstance(src, QuantLinear):
        return (src.out_features, src.in_features)
    return tuple(dense_weight(src, "?").shape)


# ---- encoding ----------------------------------------------------------------------------------
def _encode(t: dict[str, Any], cfg: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Bytes (or float array) of one tensor in its target type, plus the report record."""
    src, target = t["src"], t["target"]
    c: GGUFCodec = codec(target)
    rec: dict[str, Any] = {"target": target}
    if t["why"]:
        rec["detail"] = f"{t['why']}; written as {target}"
    if isinstance(src, torch.Tensor):
        rec["source"] = str(src.dtype).replace("torch.", "")
        exact = target == "F32" or (target == "F16" and src.dtype == torch.float16)
        rec["action"] = "copied" if exact else ("cast" if target == "F16" else "requantized")
        data = c.quantize(src.to(torch.float32).numpy())
    else:
        rec["source"] = describe_format(src)
        if t["carried"] is not None:
            data, err = t["carried"]
            rec["action"] = "lossless" if err == 0 else "near-lossless"
            if err:
                rec["detail"] = f"codes and scales kept; min = -zero*scale rounded to fp16 (max |dw| {err:.3g})"
        else:
            data = c.quantize(dense_weight(src, t["hf_name"]).to(torch.float32).numpy())
            rec["action"] = "dequantized" if target in ("F16", "F32") else "requantized"
    return _permute_rotary(data, t["hf_name"], cfg), rec


def _permute_rotary(data: np.ndarray, hf_name: str, cfg: Any) -> np.ndarray:
    """llama.cpp's q/k row order (``LlamaModel.permute`` in convert_hf_to_gguf.py); rows move whole."""
    n_head = cfg.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        n_head = getattr(cfg, "num_key_value_heads", None) or n_head
    elif not hf_name.endswith("self_attn.q_proj.weight"):
        return data
    rows = data.shape[0]
    return np.ascontiguousarray(data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2)
                                .reshape(data.shape))


# ---- metadata and tokenizer ---------------------------------------------------------------------
def _add_metadata(w: Any, lm: LoadedModel, cfg: Any, gguf_type: str) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(Path(str(lm.source)).stem or "model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gguf_type]].value)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(cfg: Any) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return rp.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def _source_gguf(lm: LoadedModel) -> Path | None:
    """The GGUF file the model was loaded from (directly or via a modelpress output's manifest)."""
    src = str(lm.source)
    if lm.kind == "modelpress" and lm.manifest:
        src = str(lm.manifest.get("source", ""))
    try:
        p = resolve_bundled(src) if src.startswith("bundled:") else Path(src)
    except ModelpressError:
        return None
    return p if p.suffix == ".gguf" and p.is_file() else None


def _add_tokenizer(w: Any, lm: LoadedModel) -> str:
    """Tokenizer fields; returns a note on where they came from."""
    src = _source_gguf(lm)
    if src is not None:
        _copy_tokenizer_fields(w, src)
        return f"tokenizer: copied from {src.name}"
    if isinstance(lm.tokenizer, Llama2cTextTokenizer):
        return _tokenizer_from_llama2c(w, lm.tokenizer)
    if lm.tokenizer is None or not hasattr(lm.tokenizer, "tok"):
        return "tokenizer: none written (the model has no Hugging Face tokenizer); llama.cpp needs one to run"
    with tempfile.TemporaryDirectory() as d:
        lm.tokenizer.save(Path(d))
        return _tokenizer_from_hf(w, Path(d))


def _copy_tokenizer_fields(w: Any, path: Path) -> None:
    import gguf

    r = gguf.GGUFReader(str(path))
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _tokenizer_from_llama2c(w: Any, tok: Llama2cTextTokenizer) -> str:
    """llama.cpp's SentencePiece (``llama``) vocabulary: the llama2.c pieces with ``▁`` for spaces, their
    scores and types, so llama.cpp's tokenizer gives run.c's ids."""
    try:
        vocab = tok.sentencepiece_vocab()
    except ModelpressError as e:
        return f"tokenizer: none written ({e}); llama.cpp needs one to run"
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(vocab.pieces))
    w.add_token_scores(list(vocab.scores))
    w.add_token_types([int(t) for t in vocab.types])
    w.add_unk_token_id(vocab.unk_id)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_add_bos_token(True)  # llama2.c models were trained with BOS first (run.c's encode(text, bos=1))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)  # run.c's dummy " " prefix
    return f"tokenizer: llama (SentencePiece) vocabulary of {len(vocab.pieces)} tokens from the llama2.c tokenizer"


def _tokenizer_from_hf(w: Any, folder: Path) -> str:
    import json

    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    tj = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").exists() else {}
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab: Any = LlamaHfVocab(folder)
        kind = "llama"
    elif model.get("type") == "BPE":
        vocab, kind = BpeVocab(folder), "gpt2"
    else:
        raise ModelpressError(f"GGUF export: tokenizer model {model.get('type')!r} is not mapped (BPE only)")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    if kind == "llama":
        w.add_token_scores(_merge_scores(model, scores))
    w.add_token_types(types)
    SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    return f"tokenizer: {kind} vocabulary of {len(tokens)} tokens from tokenizer.json (pre-tokenizer 'default')"


def _merge_scores(model: dict[str, Any], scores: list[float]) -> list[float]:
    """Scores under which llama.cpp's SentencePiece tokenizer merges as ``tokenizer.json``'s BPE does.

    llama.cpp merges the adjacent pair whose joined token scores highest; gguf-py's ``LlamaHfVocab``
    writes a -1000 placeholder for every token, under which it merges leftmost-first instead. Each
    piece a merge builds gets ``-rank`` of the first such merge; other pieces keep their score.
    """
    out, seen = list(scores), set()
    for rank, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = model["vocab"].get(a + b)
        if i is not None and i < len(out) and i not in seen:
            seen.add(i)
            out[i] = -float(rank)
    return out
