"""``--matmul-precision bf16``: the calibration forwards and Hessian products run at torch's "medium"
float32 matmul precision (bfloat16 arithmetic), the solvers stay exact, and the result stays close to
the fp32 run's."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.calib.stats import HessianAccumulator
from modelpress.core.threads import matmul_precision
from modelpress.quant.algos.gptq import method as gmethod
from tests.conftest import make_tiny_llama


def test_precision_context_is_scoped_and_checked():
    before = torch.get_float32_matmul_precision()
    with matmul_precision("bf16"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="unknown matmul precision 'tf16'"):
        with matmul_precision("tf16"):
            pass
    with pytest.raises(ModelpressError, match="unknown matmul precision"):
        mp.apply(mp.load(make_tiny_llama(seed=1, layers=1)), "rtn-w8", progress=False, matmul_precision="half")


def test_bf16_hessian_stays_within_bfloat16_error_of_the_exact_one():
    """Against a float64 reference: at most bfloat16's input rounding (about 3e-3 relative; on CPUs
    whose oneDNN splits each float32 into bfloat16 parts it is about 1e-6)."""
    torch.manual_seed(0)
    X = torch.randn(4096, 384) * torch.rand(384) * 3
    exact = (2 / X.shape[0]) * X.double().T @ X.double()
    acc = HessianAccumulator(384)
    with matmul_precision("bf16"):
        acc.update(X)
    assert float((acc.H.double() - exact).norm() / exact.norm()) < 5e-3


def test_bf16_gptq_run_keeps_the_solver_exact_and_the_result_close(monkeypatch):
    seen: list[str] = []
    stats: list[str] = []
    real, update = gmethod.gptq_quantize, HessianAccumulator.update

    def spy(*a, **kw):
        seen.append(torch.get_float32_matmul_precision())
        return real(*a, **kw)

    def spy_update(self, x):
        stats.append(torch.get_float32_matmul_precision())
        return update(self, x)

    monkeypatch.setattr(gmethod, "gptq_quantize", spy)
    monkeypatch.setattr(HessianAccumulator, "update", spy_update)
    base = make_tiny_llama(seed=3, layers=2)
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (8, 64))
    recipe = {"name": "t", "stages": [{"method": "gptq", "format": {"type": "int", "bits": 4, "granularity": 32}}]}
    runs = {}
    for p in ("fp32", "bf16"):
        lm = mp.load(copy.deepcopy(base))
        stats.clear()
        rep = mp.compress(lm, recipe, calib=calib, progress=False, matmul_precision=p)
        assert stats and set(stats) == {"medium" if p == "bf16" else "highest"}  # the Hessians ran at p
        runs[p] = (lm, rep)
    assert runs["bf16"][1]["matmul_precision"] == "bf16" and runs["fp32"][1]["matmul_precision"] == "fp32"
    assert seen and set(seen) == {"highest"}  # the column loop never runs at reduced precision
    errs = {p: [r["out_rel_error"] for r in rep["layers"]] for p, (_, rep) in runs.items()}
    for a, b in zip(errs["bf16"], errs["fp32"]):
        assert abs(a - b) <= 0.05 * b + 1e-4  # at most bf16 rounding, not a different result
    ids = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        la, lb = (runs[p][0].module(input_ids=ids).logits for p in ("fp32", "bf16"))
    assert float((la - lb).norm() / la.norm()) < 0.02


def test_training_stages_run_at_the_runs_precision(monkeypatch):
    """Block-AP's block training and a whole-model training stage (E2E-QP) take optimizer steps at
    "medium" in a bf16 run and at "highest" in an fp32 one."""
    seen: list[str] = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append(torch.get_float32_matmul_precision())
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    torch.manual_seed(0)
    calib = torch.randint(3, 300, (4, 32))
    fmt = {"type": "int", "bits": 3, "granularity": 32, "symmetric": False}
    recipe = {"name": "t", "stages": [{"method": "block-ap", "format": fmt, "samples": 4, "epochs": 1},
                                      {"method": "e2e-qp", "train": {"steps": 2, "batch_size": 2, "warmup": 0.0}}]}
    for p, want in (("bf16", "medium"), ("fp32", "highest")):
        seen.clear()
        rep = mp.compress(mp.load(make_tiny_llama(seed=2, layers=2)), recipe, calib=calib, progress=False,
                          matmul_precision=p)
        e2e = [x for s in rep["stages"] for x in s["metrics"] if x.get("stage") == "e2e-qp"]
        assert e2e and e2e[0]["steps"] == 2
        assert len(seen) >= 2 * 2 + 2 and set(seen) == {want}  # 2 blocks x 2 steps, then E2E-QP's 2
