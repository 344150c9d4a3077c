"""Running one cell of the matrix and reading what it produced (shared by the conformance tests).

Everything here goes through the public API (``modelpress.load / compress / save``), the
registries and plain ``torch`` hooks, so the engine can change underneath without touching it.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.core.layers import SAVED_LAYERS

from .archs import BY_NAME, SEQ, VOCAB
from .rows import Variant

#: 4 x 32 calibration tokens: 32 positions pass the sliding windows (16) of mistral / gemma2 /
#: starcoder2, and 128 tokens give 64-wide inputs (down_proj) a well-conditioned Hessian. With 2 x 32
#: the block-wise engines ran in half the time, but SparseGPT lost to magnitude + RTN on llama's
#: down_proj by 6-7% (a rank-64 Hessian from 64 tokens: the 1% dampening then decides the updates),
#: which invariant 4 cannot tell from a regression.
N_CALIB, CALIB_LEN = 4, SEQ
_FLOAT: dict[str, nn.Module] = {}
_OUTCOMES: dict[tuple[str, str], str | None] = {}  # (arch, stage key) -> None (ran) or the refusal


def calib_ids() -> torch.Tensor:
    """(4, 32) calibration token ids, the same for every cell (ids 0-2 are the special tokens)."""
    return torch.randint(3, VOCAB, (N_CALIB, CALIB_LEN), generator=torch.Generator().manual_seed(0))


def eval_ids() -> torch.Tensor:
    """(2, 16) held-out ids for comparing outputs."""
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def float_model(arch: str) -> nn.Module:
    """The float model of ``arch`` (built once per session; callers deep-copy before changing it)."""
    if arch not in _FLOAT:
        _FLOAT[arch] = BY_NAME[arch].build_model()
    return _FLOAT[arch]


def forward(model: nn.Module, ids: torch.Tensor) -> Any:
    """``model(input_ids=ids)`` without a KV cache (hooks may replay a block: a cache would grow)."""
    with torch.no_grad():
        try:
            return model(input_ids=ids, use_cache=False)
        except TypeError:  # a model without a cache argument
            return model(input_ids=ids)


def outputs(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (or the last hidden state) of ``model`` on ``ids``, float32, no grad."""
    out = forward(model, eval_ids() if ids is None else ids)
    t = getattr(out, "logits", None)
    return (t if t is not None else out.last_hidden_state).float()


def is_one_line_refusal(e: BaseException) -> bool:
    """A clean refusal: a ModelpressError with a one-line message that is not a traceback."""
    msg = str(e)
    return isinstance(e, ModelpressError) and msg.strip() != "" and "\n" not in msg.strip() and "Traceback" not in msg


def describe(e: BaseException) -> str:
    """``Type: message`` plus the innermost modelpress frame (where a crash happened)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/modelpress/" in f.filename]
    where = f" [at {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}]" if frames else ""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}{where}"


@dataclass
class CellResult:
    """What one (arch, stage) compression produced; ``error`` set when it raised."""

    arch: str
    variant: Variant
    lm: Any = None
    report: dict[str, Any] | None = None
    error: BaseException | None = None
    folder: Path | None = None
    reloaded: Any = None
    reload_error: BaseException | None = None
    tmp: Path | None = None
    notes: list[str] = field(default_factory=list)
    _outputs: torch.Tensor | None = None

    def outputs(self) -> torch.Tensor:
        """The compressed model's :func:`outputs` on the eval ids (computed once per cell)."""
        if self._outputs is None:
            self._outputs = outputs(self.lm.module)
        return self._outputs

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def compress(arch: str, stage: dict[str, Any], workdir: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh copy of ``arch``'s float model compressed by ``stage`` with the shared calibration."""
    lm = mp.load(copy.deepcopy(float_model(arch)))
    report = mp.compress(lm, {"name": "conformance", "stages": [stage]}, calib=calib_ids(), progress=False,
                         workdir=workdir)
    return lm, report


def run_cell(arch: str, variant: Variant) -> CellResult:
    """Compress, save and reload one cell; exceptions are kept, not raised."""
    res = CellResult(arch, variant, tmp=Path(tempfile.mkdtemp(prefix=f"conf-{arch}-")))
    try:
        res.lm, res.report = compress(arch, variant.stage)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        res.error = e
        _OUTCOMES[(arch, variant.key())] = describe(e)
        return res
    _OUTCOMES[(arch, variant.key())] = None
    try:
        res.folder = mp.save(res.lm, res.tmp / "out", report=res.report)
        res.reloaded = mp.load(str(res.folder))
    except Exception as e:  # noqa: BLE001
        res.reload_error = e
    return res


def outcome(arch: str, variant: Variant) -> str | None:
    """None when ``variant`` compresses ``arch`` (cached), else its error."""
    key = (arch, variant.key())
    if key not in _OUTCOMES:
        res = run_cell(arch, variant)
        res.cleanup()
    return _OUTCOMES[key]


def activation_layers(folder: Path) -> list[str]:
    """Layers of a saved folder whose manifest entry declares ``transforms_activations`` (they
    quantise or zero their inputs at run time, so a dense weight alone does not reproduce them)."""
    layers = json.loads((folder / "modelpress.json").read_text()).get("layers", {})
    return sorted(n for n, info in layers.items() if info.get("transforms_activations"))


# ---- reading models ---------------------------------------------------------------------------------
def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every instance of a registered compressed layer class."""
    out = {}
    for n, m in model.named_modules():
        tag = getattr(m, "layer_tag", None)
        if isinstance(tag, str) and tag in SAVED_LAYERS and isinstance(m, SAVED_LAYERS.get(tag)):
            out[n] = m
    return out


def effective_weight(m: nn.Module) -> torch.Tensor | None:
    """The (out, in) float weight a layer computes with (dequantised / masked), or None."""
    for attr in ("dequantized_weight", "effective_weight"):
        fn = getattr(m, attr, None)
        if callable(fn):
            w = fn().detach().float()
            return w.reshape(w.shape[0], -1)
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        from modelpress.models.layers import is_conv1d

        return (w.t() if is_conv1d(m) else w).detach().float()
    return None


def float_weight(model: nn.Module, name: str) -> torch.Tensor | None:
    """The float (out, in) weight of layer ``name`` in ``model`` (None when absent)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return effective_weight(m)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the first ModuleList as long as the config's layer count."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and len(m) > 0:
            return list(m)
    return []


def changed_layers(res: CellResult) -> list[str]:
    """Layers the method reported on or replaced (a dense-storage pruner keeps plain layers)."""
    names = {r["name"] for r in report_layers(res.report)} | set(compressed_layers(res.lm.module))
    return sorted(names)


def others_unchanged(float_m: nn.Module, comp_m: nn.Module, changed: list[str]) -> bool:
    """Whether every tensor outside the ``changed`` layers equals the float model's (no rescaling,
    no folded scales: layer inputs are in the same basis as the float model's)."""
    prefixes = tuple(n + "." for n in changed)
    fsd = float_m.state_dict()
    for k, v in comp_m.state_dict().items():
        if k.startswith(prefixes):
            continue
        if k in fsd and fsd[k].shape == v.shape and not torch.equal(fsd[k], v):
            return False
    return True


def rescaled_layers(float_m: nn.Module, comp_m: nn.Module, names: list[str]) -> set[str]:
    """Changed layers that an equivalence transform rescaled against each other: a producer whose
    output rows were divided by ``s`` and a consumer whose input columns were multiplied by ``s``
    (AWQ's ``v_proj -> o_proj``, ``up_proj -> down_proj``). Both are compressed, so no other tensor
    changes. Found from the best diagonal fits to the float weights (per producer row, per consumer
    column): a fold makes their logarithms strongly anti-correlated while the consumer's scales
    spread; quantisation noise leaves them uncorrelated (measured: AWQ folds -0.8 and below, noise
    pairs within +-0.3), and pruning shrinks both sides together."""
    fits = {}
    for n in names:
        W, Q = float_weight(float_m, n), float_weight(comp_m, n)
        if W is None or Q is None or W.shape != Q.shape:
            continue
        qw = Q * W  # (out, in)
        rows = qw.sum(1) / (W * W).sum(1).clamp_min(1e-20)  # (out,)
        cols = qw.sum(0) / (W * W).sum(0).clamp_min(1e-20)  # (in,)
        fits[n] = (rows.clamp_min(1e-3).log(), cols.clamp_min(1e-3).log())
    out: set[str] = set()
    for prod, (rows, _) in fits.items():
        for cons, (_, cols) in fits.items():
            if cons == prod or rows.shape != cols.shape or float(cols.std()) < 0.03:
                continue
            r0, c0 = rows - rows.mean(), cols - cols.mean()
            corr = float((r0 * c0).sum() / ((r0 * r0).sum() * (c0 * c0).sum()).sqrt().clamp_min(1e-20))
            if corr < -0.5:
                out |= {prod, cons}
    return out


def capture_layer_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs (tokens, in) of the named layers while ``model`` runs ``ids``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())) for n in names]
    try:
        forward(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


def norm_fold_scales(float_m: nn.Module, comp_m: nn.Module, names: list[str],
                     ids: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]] | None:
    """Per layer of ``names``, the folded norm that feeds it and the per-input-channel ``s`` by which
    the scale folded into that norm divided its input (AWQ / SmoothQuant: the norm's weight became
    ``w / s``, the layer's weight ``W * s``); layers fed otherwise get no entry. None when some changed tensor outside
    ``names`` is not a norm weight this explains (e.g. a scale folded into a linear: unknown ``s``).

    Found without architecture knowledge: the modules outside the changed layers whose 1-D weight
    differs from the float model's are the folded norms (``s = w_float / w_compressed``, exact up to
    one float32 rounding), and a layer is fed by one when its input is the very tensor that norm
    returned in the compressed model."""
    prefixes = tuple(n + "." for n in names)
    fsd, csd = float_m.state_dict(), comp_m.state_dict()
    changed = [k for k, v in csd.items() if not k.startswith(prefixes) and k in fsd
               and fsd[k].shape == v.shape and not torch.equal(fsd[k], v)]
    norms = {k.rpartition(".")[0] for k in changed if k.endswith(".weight") and csd[k].dim() == 1}
    if any(k.rpartition(".")[0] not in norms for k in changed):
        return None
    outs: list[tuple[torch.Tensor, str]] = []  # kept alive: no later tensor can take an output's place
    feeds: dict[str, str] = {}

    def norm_hook(n: str):
        def hook(_m, _a, out) -> None:
            outs.append((out, n))
        return hook

    def layer_hook(n: str):
        def hook(_m, a) -> None:  # (returns None: the input is left as it is)
            feeds.setdefault(n, next((norm for t, norm in outs if t is a[0]), ""))
        return hook

    hooks = [comp_m.get_submodule(n).register_forward_hook(norm_hook(n)) for n in norms]
    hooks += [comp_m.get_submodule(n).register_forward_pre_hook(layer_hook(n)) for n in names]
    try:
        forward(comp_m, ids)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for n, norm in feeds.items():
        if norm:
            s = fsd[norm + ".weight"].float() / csd[norm + ".weight"].float()  # (in,)
            if not bool(torch.isfinite(s).all()):
                return None
            scales[n] = (norm, s)
    return scales


def capture_block_calls(model: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, first output) of every block call while ``model`` runs ``ids``."""
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def hook(_m, args, kwargs, out):
        o = out[0] if isinstance(out, tuple) else out
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs), o.detach()))

    hooks = [b.register_forward_hook(hook, with_kwargs=True) for b in find_blocks(model)]
    try:
        forward(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return calls


def block_output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = block(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp_min(1e-20))


def report_layers(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((report or {}).get("layers") or [])


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)
