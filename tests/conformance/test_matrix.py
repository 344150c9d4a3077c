"""The conformance matrix: every registered method x every format / pattern it accepts x tiny models
of every architecture in ``archs.py`` (sampling rule in ``cells.py``), each invariant its own test.

Per cell (arch, method variant), one compression with the shared 4 x 32 calibration tokens, then:

* ``test_compresses``: it runs and gives finite outputs, or refuses with one ``ModelpressError``
  line. A run-time refusal of a format / pattern / storage variant that is refused on every
  reference architecture (llama, gpt2) while the method's defaults run there is a failure: the
  refusal does not depend on the model, so it belongs to recipe load.
* ``test_save_reload_same_outputs`` (invariant 1): ``modelpress.save`` then ``modelpress.load``
  gives bit-identical logits.
* ``test_saved_weight_is_what_was_computed`` (invariant 3): every compressed layer reloads as the
  same class with bit-identical stored tensors (codes, scales, masks) and dequantised weight, and
  the per-layer ``rel_error`` the method reported (computed from the weight it optimised) equals
  ``||W - W_saved|| / ||W||`` of the saved weight (not checkable where scales were folded: into
  norms, or between two compressed layers, ``harness.rescaled_layers``).
* ``test_dense_output_loads_in_transformers`` (invariant 2): ``storage: dense`` outputs and plain
  outputs (structured pruning) through ``transformers`` ``from_pretrained`` of the saved folder,
  bitmask pruning after ``densify``, everything else through the ``hf`` export. Layers whose saved
  entry declares ``transforms_activations`` (W8A8, LLM.int8(), activation sparsity) have no dense
  equivalent: the hf export must refuse them in one line, and write their dequantised weights
  exactly with ``on_unsupported="dequantize"``. On each method's defaults and one method's
  representative of every group on each FULL_ARCH (a different method on each), and on the
  defaults of the data-free methods on every other architecture: the export path depends on the
  layer class and the architecture, not on the format's parameters (whose dequantised weight
  invariant 3 checks on every cell), and calibrated methods produce the same layer classes as the
  data-free ones.
* ``test_error_no_worse_than_data_free`` (invariant 4): calibrated methods against the data-free
  method of the same format / pattern (RTN, magnitude) on the same calibration tokens, per layer in
  the layer's own basis (scales folded into norms are read back from them: ``_layer_errors``; per
  set of layers sharing one folded scale), per block where scales were folded between two
  compressed layers; slack and reasons at ``REL_SLACK``.

Tests of one cell run together (``conftest.pytest_collection_modifyitems``) and share one
compression, kept until the next cell starts.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.core.method import METHODS, StageKind
from modelpress.pipeline.recipe import parse_recipe

from . import harness as H
from .cells import FULL_ARCHS, Cell, cells
from .rows import Variant, _base_stage

#: Invariant 4 slack. GPTQ / SparseGPT minimise exactly the measured layer error (||X (W - Q)^T||
#: on the inputs the layer receives in the compressed model) but greedily, column by column, with
#: 1% dampening, and group parameters fitted on updated weights: on a 32-wide random layer with
#: 128 tokens that can lose to plain rounding by a hair. AWQ is judged in each layer's own basis
#: (scales folded into norms read back from them), per set of layers sharing one scale; its clip
#: search sees the float model's inputs, not the compressed model's. 5% (relative) + 1e-4
#: (absolute) is below the gaps broken methods showed (2x and more; AWQ clipping NF4 / NVFP4
#: groups under re-fitted tensor-wide parameters lost 6-7% per layer and was a real bug), and above
#: the noise seen on healthy cells. Quantisers are held to it per layer (per block when scales were
#: folded between two compressed layers). Pruning without a format is held to it on the mean over
#: layers: Wanda's score |W| ||x|| is a heuristic, not the minimiser of the layer error, and on a
#: random tiny model it loses to magnitude on single layers by more than 5% (v_proj 0.276 vs 0.263).
#: Joint pruning + quantisation (SparseGPT with a format) is judged the same way: the pruning
#: dominates its error, and SparseGPT's greedy left-to-right OBS can lose a single tiny layer to
#: magnitude. Measured on starcoder2's layer-0 v_proj (16 x 32, 128 tokens, Hessian condition
#: number 3e4): SparseGPT alone 0.315 vs magnitude 0.294 (the last columns have few columns left to
#: absorb their pruning error); least squares on each mask gives 0.275 (SparseGPT's) vs 0.260
#: (magnitude's); with NVFP4 0.323 vs 0.301. Not a format bug: rounding alone adds 0.008 in both.
REL_SLACK, ABS_SLACK = 0.05, 1e-4
#: Cells that fail the error invariant for a reason found but not yet fixed: each is an open finding,
#: reported as xfail (not hidden) so the rest of the matrix keeps guarding. Remove an entry once fixed.
#: (Block-AP at 8 bits, llama int_fz8-g16, was one until Block-AP capped a layer's weight lr at 1% of
#: its mean step size: Adam had moved each weight by about weight_lr per step whatever the grid.)
OPEN_FINDINGS: dict[str, str] = {}
#: Relative tolerance of the reported-vs-saved ``rel_error`` check: both are float32 norms of the
#: same difference; anything above 1e-4 means the saved tensor is not the one the method measured.
REPORT_RTOL = 1e-4

_CURRENT: dict[str, H.CellResult] = {}


def get(cell: Cell) -> H.CellResult:
    """The cell's compression, computed once; the previous cell's is dropped (memory stays flat)."""
    if cell.id not in _CURRENT:
        for old in _CURRENT.values():
            old.cleanup()
        _CURRENT.clear()
        _CURRENT[cell.id] = H.run_cell(cell.arch, cell.variant)
    return _CURRENT[cell.id]


def compressed_or_skip(cell: Cell) -> H.CellResult:
    res = get(cell)
    if res.error is not None:
        pytest.skip(f"did not compress (see test_compresses): {H.describe(res.error)}")
    return res


def reloaded_or_fail(res: H.CellResult):
    if res.reload_error is not None:
        pytest.fail(f"save -> load failed: {H.describe(res.reload_error)}")
    return res.reloaded


def defaults_variant(method: str) -> Variant:
    """The method with its own defaults (plus the shared knobs): the reference run of a method."""
    return Variant(method, "defaults", _base_stage(method, METHODS.get(method).config), "defaults", True, "default")


ALL = list(cells())


def _ids(cs: list[Cell]) -> list[str]:
    return [c.id for c in cs]


# ---- runs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ALL, ids=_ids(ALL))
def test_compresses(cell: Cell) -> None:
    res = get(cell)
    if res.error is None:
        out = res.outputs()
        assert torch.isfinite(out).all(), f"{cell.id}: compressed model gives non-finite outputs"
        return
    e = res.error
    if not H.is_one_line_refusal(e):
        pytest.fail(f"{cell.id}: crashed instead of compressing or refusing: {H.describe(e)}")
    v = cell.variant
    if v.axis != "default" and _refused_regardless_of_model(v):
        pytest.fail(f"{cell.id}: the recipe validated but the run refused it on every reference architecture "
                    f"({', '.join(REFERENCE_ARCHS)}), where {v.method}'s defaults run: {e}; a refusal that does not "
                    f"depend on the model belongs to recipe load ({v.method} x {v.group})")
    pytest.skip(f"refused cleanly at run time: {e}")


REFERENCE_ARCHS = ("llama", "gpt2")


def _refused_regardless_of_model(v: Variant) -> bool:
    """Refused on every reference architecture while the method's defaults run on each of them: the
    refusal is about the method and its format / pattern, which a recipe load can already see."""
    ref = defaults_variant(v.method)
    return all(H.outcome(a, ref) is None and H.outcome(a, v) is not None for a in REFERENCE_ARCHS)


# ---- invariant 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ALL, ids=_ids(ALL))
def test_save_reload_same_outputs(cell: Cell) -> None:
    res = compressed_or_skip(cell)
    back = reloaded_or_fail(res)
    a, b = res.outputs(), H.outputs(back.module)
    assert a.shape == b.shape, f"{cell.id}: output shape {tuple(a.shape)} after reload, {tuple(b.shape)} before"
    assert torch.equal(a, b), (f"{cell.id}: outputs differ after save -> load "
                               f"(max |diff| {float((a - b).abs().max()):.3e}, rel {H.rel(b, a):.3e})")


# ---- invariant 3 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ALL, ids=_ids(ALL))
def test_saved_weight_is_what_was_computed(cell: Cell) -> None:
    res = compressed_or_skip(cell)
    back = reloaded_or_fail(res)
    mem, disk = H.compressed_layers(res.lm.module), H.compressed_layers(back.module)
    assert sorted(mem) == sorted(disk), (f"{cell.id}: compressed layers differ after reload: only in memory "
                                         f"{sorted(set(mem) - set(disk))[:4]}, only reloaded {sorted(set(disk) - set(mem))[:4]}")
    for name, m in mem.items():
        d = disk[name]
        assert type(d) is type(m), f"{cell.id}: {name} reloads as {type(d).__name__}, was {type(m).__name__}"
        sm, sd = m.state_dict(), d.state_dict()
        assert sorted(sm) == sorted(sd), f"{cell.id}: {name} stored tensors {sorted(sm)} reload as {sorted(sd)}"
        for k in sm:
            assert sm[k].dtype == sd[k].dtype and torch.equal(sm[k], sd[k]), \
                f"{cell.id}: {name}.{k} differs after reload (dtype {sm[k].dtype} -> {sd[k].dtype})"
        wm, wd = H.effective_weight(m), H.effective_weight(d)
        if wm is not None:
            assert torch.equal(wm, wd), f"{cell.id}: dequantised weight of {name} differs after reload"
    _check_reported_rel_error(cell, res, back)


def _check_reported_rel_error(cell: Cell, res: H.CellResult, back) -> None:
    """The reported ``rel_error`` (from the weight the method optimised) matches the saved weight."""
    base, names = H.float_model(cell.arch), H.changed_layers(res)
    if not H.others_unchanged(base, res.lm.module, names):
        return  # scales were folded into norms: the method's W is not the float model's (AWQ, SmoothQuant)
    rescaled = H.rescaled_layers(base, res.lm.module, names)  # folded between two compressed linears
    bad = []
    for r in H.report_layers(res.report):
        if r.get("rel_error") is None or r["name"] in rescaled:
            continue
        w, s = H.float_weight(base, r["name"]), H.float_weight(back.module, r["name"])
        if w is None or s is None or w.shape != s.shape:
            continue
        saved = H.rel(s, w)
        if abs(saved - r["rel_error"]) > REPORT_RTOL * max(saved, r["rel_error"]) + 1e-7:
            bad.append(f"{r['name']}: reported {r['rel_error']:.6g}, saved weight gives {saved:.6g}")
    assert not bad, (f"{cell.id}: the saved weight is not the one the method reported "
                     f"({len(bad)} layer(s)): {'; '.join(bad[:3])}")


# ---- invariant 2 -----------------------------------------------------------------------------------
def _auto(cell: Cell):
    import transformers

    return transformers.AutoModelForMaskedLM if cell.encoder else transformers.AutoModelForCausalLM


def _plain_reload(cell: Cell, folder: Path):
    try:
        return _auto(cell).from_pretrained(str(folder), dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{cell.id}: plain transformers cannot load the dense output {folder.name}: {H.describe(e)}")


def _data_free(method: str) -> bool:
    e = METHODS.get(method)
    return e.kind == StageKind.DATA_FREE and not e.needs_calibration


def _dense_cells() -> list[Cell]:
    """Every method's defaults on the FULL_ARCHS and each group's representative of one method there
    (the k-th of the methods that have the group on the k-th reference architecture, so two methods
    per group when two have it); the data-free methods' defaults everywhere else."""
    picked = []
    for k, arch in enumerate(FULL_ARCHS):
        mine = [c for c in ALL if c.arch == arch and c.variant.representative]
        methods: dict[str, list[str]] = {}
        for c in mine:
            methods.setdefault(c.variant.group, []).append(c.variant.method)
        picked += [c for c in mine if c.variant.group == "defaults"
                   or c.variant.method == sorted(methods[c.variant.group])[k % len(methods[c.variant.group])]]
    return picked + [c for c in ALL if c.arch not in FULL_ARCHS and c.variant.group == "defaults"
                     and _data_free(c.variant.method)]


DENSE = sorted(_dense_cells(), key=lambda c: c.order)


@pytest.mark.parametrize("cell", DENSE, ids=_ids(DENSE))
def test_dense_output_loads_in_transformers(cell: Cell) -> None:
    res = compressed_or_skip(cell)
    if res.folder is None:
        pytest.fail(f"save failed: {H.describe(res.reload_error)}")
    active = H.activation_layers(res.folder)
    if active:  # not a dense output: what the hf export must do with it instead
        return _check_activation_layers_not_densified(cell, res, active)
    comp = H.compressed_layers(res.lm.module)
    ref = res.outputs()
    tmp = Path(tempfile.mkdtemp(prefix="conf-dense-"))
    try:
        if not comp:  # storage: dense, structured pruning: the saved folder itself is plain
            reloaded_or_fail(res)
            how, model = "the saved folder", _plain_reload(cell, res.folder)
        elif all(getattr(m, "layer_tag", None) == "sparse" for m in comp.values()):
            from modelpress.sparsity.layer import densify

            dense = mp.load(copy.deepcopy(res.lm.module))
            densify(dense.module)
            how, model = "densify + save", _plain_reload(cell, mp.save(dense, tmp / "dense"))
        else:
            from modelpress.export.export import export

            try:
                export(res.lm, "hf", tmp / "hf")
            except ModelpressError as e:
                pytest.skip(f"hf export refuses this model cleanly: {e}")
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{cell.id}: hf export crashed: {H.describe(e)}")
            how, model = "the hf export", _plain_reload(cell, tmp / "hf")
        out = H.outputs(model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Same weights, possibly another kernel (Conv1D's addmm vs F.linear): float32 rounding only.
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (
        f"{cell.id}: {how} reloaded in plain transformers gives other outputs than the compressed model "
        f"(rel {H.rel(out, ref):.3e}, compressed layer types {sorted({type(m).__name__ for m in comp.values()})})")


def _check_activation_layers_not_densified(cell: Cell, res: H.CellResult, active: list[str]) -> None:
    """Layers whose saved entry declares ``transforms_activations`` (W8A8, LLM.int8(), activation
    sparsity) compute with more than a dense weight, so no plain folder gives their outputs. The hf
    export refuses them in one line naming one of them; with ``on_unsupported="dequantize"`` it
    writes their dequantised weights exactly (or refuses cleanly where a layer has no single weight)."""
    from modelpress.export.export import export

    tmp = Path(tempfile.mkdtemp(prefix="conf-dense-"))
    try:
        with pytest.raises(ModelpressError) as refused:
            export(res.lm, "hf", tmp / "refused")
        assert H.is_one_line_refusal(refused.value) and any(n in str(refused.value) for n in active), (
            f"{cell.id}: the hf export's refusal of activation-transforming layers is not one line naming them: "
            f"{refused.value}")
        try:
            export(res.lm, "hf", tmp / "hf", on_unsupported="dequantize")
        except ModelpressError as e:
            assert H.is_one_line_refusal(e), f"{cell.id}: hf export (dequantize) refuses in more than one line: {e}"
            return
        plain = _plain_reload(cell, tmp / "hf")
        bad = [n for n, m in H.compressed_layers(res.lm.module).items()
               if (w := H.effective_weight(m)) is not None and not torch.equal(H.float_weight(plain, n), w)]
        assert not bad, f"{cell.id}: the hf export (dequantize) does not hold the dequantised weights of {bad[:3]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- invariant 4 -----------------------------------------------------------------------------------
def _baseline_stages(stage: dict) -> list[dict] | None:
    """The plain data-free stages doing the same job: prune with the cell's pattern (and sparsity,
    storage), then round to the cell's format. The method for each is found in the registry, not by
    name: the data-free, calibration-free method with that field and the fewest config fields (plain
    rounding / magnitude, not a data-free optimiser such as HQQ)."""
    cfg = parse_recipe({"stages": [stage]}).stages[0]
    out = []
    for field in ("pattern", "format"):
        value = getattr(cfg, field, None)
        if value is None:
            continue
        extra = {k: getattr(cfg, k) for k in ("sparsity", "storage") if field == "pattern" and hasattr(cfg, k)}
        plain = sorted((len(e.config.model_fields), name) for name, e in METHODS.items()
                       if e.kind == StageKind.DATA_FREE and not e.needs_calibration and field in e.config.model_fields
                       and all(k in e.config.model_fields for k in extra))
        for _, name in plain:
            cand = {"method": name, field: value.to_dict(), **{k: v for k, v in extra.items() if v is not None}}
            try:
                parse_recipe({"stages": [cand]})
            except ModelpressError:
                continue
            out.append(cand)
            break
        else:
            return None
    return out or None


_BASELINES: dict[str, object] = {}


def _baseline(arch: str, stages: list[dict]):
    """The float model compressed by the data-free stages (cached: GPTQ, AWQ and SparseGPT cells of
    one format share it), or the baseline's refusal."""
    key = H.dumps([arch, stages])
    if key not in _BASELINES:
        lm = mp.load(copy.deepcopy(H.float_model(arch)))
        try:
            mp.compress(lm, {"name": "baseline", "stages": stages}, progress=False)
            _BASELINES[key] = lm
        except ModelpressError as e:
            _BASELINES[key] = str(e)
    return _BASELINES[key]


CALIBRATED = [c for c in ALL if METHODS.get(c.variant.method).needs_calibration
              and ({"format", "pattern"} & set(METHODS.get(c.variant.method).config.model_fields))
              and not c.encoder]


@pytest.mark.parametrize("cell", CALIBRATED, ids=_ids(CALIBRATED))
def test_error_no_worse_than_data_free(cell: Cell) -> None:
    res = compressed_or_skip(cell)
    stages = _baseline_stages(cell.variant.stage)
    if stages is None:
        pytest.skip("no data-free method registered for this format / pattern")
    base_lm = _baseline(cell.arch, stages)
    if isinstance(base_lm, str):
        pytest.skip(f"the data-free baseline refuses: {base_lm}")
    what = "+".join(s["method"] for s in stages)
    float_m, comp_m = H.float_model(cell.arch), res.lm.module
    names = H.changed_layers(res)
    rescaled = H.rescaled_layers(float_m, comp_m, names)
    # a reconstruction stage (Block-AP) trades each layer's error for its block's output error, which
    # is what it minimises: judged per block
    reconstructs = METHODS.get(cell.variant.method).kind == StageKind.RECONSTRUCTION
    scales = None if rescaled or reconstructs else H.norm_fold_scales(float_m, comp_m, names, H.calib_ids())
    if scales is not None:
        errors = _layer_errors(float_m, comp_m, base_lm.module, names, scales)
        unit = "layer output" + (" (input scales folded into norms, measured in each layer's own basis)" if scales else "")
    else:
        errors, unit = _block_errors(float_m, comp_m, base_lm.module), "block output (scales folded between layers)"
    stage = parse_recipe({"stages": [cell.variant.stage]}).stages[0]
    if getattr(stage, "format", None) is not None and getattr(stage, "pattern", None) is None:
        worse = [f"{n}: {c:.4f} vs {b:.4f}" for n, c, b in errors if c > b * (1 + REL_SLACK) + ABS_SLACK]
    else:  # pruning, with or without a format: the mean over layers (see REL_SLACK)
        c = sum(e[1] for e in errors) / max(len(errors), 1)
        b = sum(e[2] for e in errors) / max(len(errors), 1)
        worse = [f"mean over {len(errors)} layers: {c:.4f} vs {b:.4f}"] if c > b * (1 + REL_SLACK) + ABS_SLACK else []
    if worse and cell.id in OPEN_FINDINGS:
        pytest.xfail(f"open finding: {OPEN_FINDINGS[cell.id]}; now: {worse[0]}")
    assert not worse, (f"{cell.id}: {unit} error worse than {what} on the same calibration tokens "
                       f"in {len(worse)} place(s): {'; '.join(worse[:3])}")


def _layer_errors(float_m, comp_m, base_m, names: list[str],
                  scales: dict[str, tuple[str, torch.Tensor]]) -> list[tuple[str, float, float]]:
    """(layer, method's error, baseline's error) per changed layer: ``||X_c Q^T - X W^T|| / ||X W^T||``
    against ``||X B^T - X W^T|| / ||X W^T||``, with ``X_c`` the layer's inputs in the compressed model
    and ``X = X_c * s`` the same inputs in the float basis (``s`` from :func:`H.norm_fold_scales`,
    1 where nothing was folded): what GPTQ / SparseGPT minimise per layer.

    Layers fed by one folded norm (q/k/v, gate/up) share one ``s``, chosen for them together: AWQ
    minimises their joint output error ((X / s) Q(W_i s)^T against X W_i^T, summed over i; its
    default ``loss: module`` scores the attention / MLP output they feed), so one of them may lose
    to rounding while the set gains (measured: starcoder2 fp8, k_proj 0.031 vs 0.024 with the q/k/v
    set at 0.0185 vs 0.0234). Such a set is one row, its errors summed in squares."""
    names = [n for n in names if H.float_weight(base_m, n) is not None and H.float_weight(comp_m, n) is not None]
    Xc = H.capture_layer_inputs(comp_m, names, H.calib_ids())
    sums: dict[str, list[float]] = {}  # row -> [method's squared error, baseline's, reference's]
    for n in names:
        W, Q, B = H.float_weight(float_m, n), H.float_weight(comp_m, n), H.float_weight(base_m, n)
        if n not in Xc or W is None or Q is None or W.shape != Q.shape or B.shape != W.shape:
            continue
        norm, s = scales.get(n, ("", None))
        X = Xc[n] * s.view(1, -1) if s is not None else Xc[n]  # (tokens, in), float basis
        ref = X @ W.T  # (tokens, out)
        row = sums.setdefault(f"layers fed by {norm}" if norm else n, [0.0, 0.0, 0.0])
        for k, out in enumerate((Xc[n] @ Q.T - ref, X @ B.T - ref, ref)):
            row[k] += float(out.double().pow(2).sum())
    return [(n, (c / max(r, 1e-40)) ** 0.5, (b / max(r, 1e-40)) ** 0.5) for n, (c, b, r) in sums.items()]


def _block_errors(float_m, comp_m, base_m) -> list[tuple[str, float, float]]:
    """Per block: float, compressed and baseline block on the compressed model's block inputs."""
    calls = H.capture_block_calls(comp_m, H.calib_ids())
    fb, bb = H.find_blocks(float_m), H.find_blocks(base_m)
    rows = []
    for i, (args, kwargs, out_c) in enumerate(calls[:len(fb)]):
        ref = H.block_output(fb[i], args, kwargs)
        rows.append((f"block {i}", H.rel(out_c, ref), H.rel(H.block_output(bb[i], args, kwargs), ref)))
    return rows
