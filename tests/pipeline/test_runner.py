"""The Runner: stage kinds, the frozen float reference, gradient mode, the report."""
from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.core.method import METHODS, MethodConfig, MethodEntry, StageKind
from modelpress.pipeline.reference import FloatReference
from tests.conftest import make_tiny_llama


class ProbeConfig(MethodConfig):
    method: Literal["probe-recon", "probe-train"] = "probe-recon"


class ReconProbe:
    """Records, per block, the float targets the runner hands a reconstruction stage."""

    seen: dict[int, torch.Tensor] = {}

    def process_block(self, lm, index, block, prefix, inputs, ctx, targets):
        ReconProbe.seen[index] = targets.clone()


def train_probe(lm, cfg, ctx):
    train_probe.grad = torch.is_grad_enabled()
    with torch.no_grad():
        train_probe.ref_logits = ctx.reference.model()(input_ids=ctx.calib).logits


@pytest.fixture
def probes():
    METHODS.register("probe-recon")(MethodEntry(ProbeConfig, None, needs_calibration=True,
                                                block_stage=lambda lm, cfg: ReconProbe(), kind=StageKind.RECONSTRUCTION))
    METHODS.register("probe-train")(MethodEntry(ProbeConfig, train_probe, needs_calibration=True, grad=True,
                                                needs_reference=True, kind=StageKind.TRAINING))
    yield
    METHODS.unregister("probe-recon")
    METHODS.unregister("probe-train")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2))


def _block_outputs(model, ids):
    """Each block's output on ``ids`` in the float model (forward hooks), stacked per block."""
    outs: dict[int, list[torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs.setdefault(i, []).append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in outs.items()}


def test_reconstruction_stage_sees_float_outputs_after_an_earlier_stage_changed_the_model(probes, calib):
    base = make_tiny_llama(seed=4, layers=3)
    want = _block_outputs(copy.deepcopy(base), calib)
    lm = mp.load(copy.deepcopy(base))
    ReconProbe.seen = {}
    report = mp.compress(lm, {"stages": [{"method": "rtn", "format": {"type": "int", "bits": 3, "granularity": 32}},
                                         {"method": "probe-recon"}]}, calib=calib, progress=False)
    assert type(lm.module.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"  # the model did change
    assert sorted(ReconProbe.seen) == [0, 1, 2]
    for i in range(3):
        torch.testing.assert_close(ReconProbe.seen[i], want[i], rtol=1e-5, atol=1e-5)
    assert [s["kind"] for s in report["stages"]] == ["data_free", "reconstruction"]


def test_training_stage_runs_with_gradients_and_a_streamed_float_reference(probes, calib):
    base = make_tiny_llama(seed=6, layers=2)
    with torch.no_grad():
        want = base(input_ids=calib).logits
    lm = mp.load(copy.deepcopy(base))
    mp.compress(lm, {"stages": [{"method": "rtn", "format": {"type": "int", "bits": 2, "granularity": 32}},
                                {"method": "probe-train"}]}, calib=calib, progress=False)
    assert train_probe.grad is True
    torch.testing.assert_close(train_probe.ref_logits, want, rtol=1e-5, atol=1e-5)
    assert torch.is_grad_enabled()  # the caller's mode is back


def test_reference_reads_source_files_instead_of_a_snapshot(tiny_llama_dir, tmp_path):
    lm = mp.load(str(tiny_llama_dir))
    ref = FloatReference.snapshot(lm, tmp_path)
    assert ref.owned is None and not (tmp_path / "reference").exists()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ref.model()(input_ids=ids).logits, lm.module(input_ids=ids).logits)


def test_reference_blocks_do_not_carry_the_callers_hooks(tmp_path):
    """The caller's hooks on its model (a profiler, an interrupt) must not fire on the float copies."""
    lm = mp.load(make_tiny_llama(seed=2, layers=2))
    calls = []
    lm.module.model.layers[1].register_forward_pre_hook(lambda *_: calls.append("pre"))
    lm.module.model.layers[1].mlp.register_forward_hook(lambda *_: calls.append("post"))
    ref = FloatReference.snapshot(lm, tmp_path)
    with torch.no_grad():
        ref.model()(input_ids=torch.randint(0, 300, (1, 8)))
    assert calls == []
    with torch.no_grad():
        lm.module(input_ids=torch.randint(0, 300, (1, 8)))
    assert calls == ["pre", "post"]
    ref.close()


def test_snapshot_is_removed_with_the_run(probes, calib, tmp_path):
    lm = mp.load(make_tiny_llama(seed=1, layers=2))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("user file")
    mp.compress(lm, {"stages": [{"method": "probe-recon"}]}, calib=calib, progress=False, workdir=tmp_path / "w")
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["mine.txt"]


def test_report_has_stage_timings_and_before_after_evaluation(tiny_llama_dir, tiny_text_file, calib):
    lm = mp.load(str(tiny_llama_dir))
    rep = mp.compress(lm, {"stages": [{"method": "magnitude", "sparsity": 0.5},
                                      {"method": "gptq", "format": {"type": "int", "bits": 4, "granularity": 32}}]},
                      calib=calib, progress=False, eval_data=tiny_text_file, eval_seq_len=64)
    ev = rep["eval"]
    assert ev["baseline"]["perplexity"] < ev["compressed"]["perplexity"] and ev["delta_ppl_pct"] > 0
    assert [s["stages"] for s in rep["stages"]] == [["magnitude"], ["gptq"]]
    assert [s["kind"] for s in rep["stages"]] == ["data_free", "blockwise"]
    assert all(s["seconds"] >= 0 and s["cpu_seconds"] >= 0 for s in rep["stages"])
    assert rep["stages"][0]["layers"] == 14 and rep["stages"][1]["layers"] == 14


def test_reconstruction_without_calibration_is_refused_before_work(probes):
    lm = mp.load(make_tiny_llama(seed=2, layers=2))
    before = copy.deepcopy(lm.module.state_dict())
    with pytest.raises(ModelpressError, match="calibration"):
        mp.compress(lm, {"stages": [{"method": "rtn"}, {"method": "probe-recon"}]}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in lm.module.state_dict().items())


def test_block_error_is_zero_on_the_float_model_and_grows_after_quantisation(calib):
    base = make_tiny_llama(seed=7, layers=3)
    rep0 = mp.compress(mp.load(copy.deepcopy(base)), {"stages": [{"method": "block-error"}]}, calib=calib, progress=False)
    assert [r["out_rel_error"] for r in rep0["layers"]] == [0.0, 0.0, 0.0]
    rep = mp.compress(mp.load(copy.deepcopy(base)), {"stages": [
        {"method": "gptq", "format": {"type": "int", "bits": 3, "granularity": 32}}, {"method": "block-error"}]},
        calib=calib, progress=False)
    errs = [r["out_rel_error"] for r in rep["layers"] if r["method"] == "block-error"]
    assert len(errs) == 3 and 0 < errs[0] and all(e > 0.01 for e in errs)
    assert rep["stages"][0]["kind"] == "blockwise+reconstruction"


def test_mean_bits_counts_each_layer_once_weighted_by_size():
    """Two records for one layer (GPTQ then Block-AP): the last counts; sizes weight the mean."""
    from modelpress.pipeline.runner import final_bits

    layers = [{"name": "a", "shape": (8, 8), "bits_per_weight": 4.0},
              {"name": "a", "shape": (8, 8), "bits_per_weight": 3.0},   # a later stage re-quantised it
              {"name": "b", "shape": (8, 24), "bits_per_weight": 5.0},
              {"name": "c", "shape": (8, 8), "bits_per_weight": None}]  # a record without bits
    bits, mean = final_bits(layers)
    assert bits == {"a": 3.0, "b": 5.0}
    assert mean == (3.0 * 64 + 5.0 * 192) / 256
    assert final_bits([]) == ({}, None)
