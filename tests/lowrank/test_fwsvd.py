"""The ``fwsvd`` stage on tiny models built in code: its row Fisher against per-batch gradients taken
independently (HF's own ``labels=`` loss, ``torch.autograd.grad``), the factors it installs are the
ones that Fisher gives, FWSVD beats plain SVD on the Fisher-weighted error it targets, the built-in
recipe end to end (API and command line) reloads bit-identical, and its refusals."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.lowrank.factor import fisher_scale, scaled_factor
from modelpress.lowrank.fwsvd import row_fisher
from modelpress.lowrank.layer import LowRankLinear
from modelpress.pipeline.recipe import load_recipe, parse_recipe
from tests.conftest import TEXT, make_tiny_llama, make_tokenizer

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base():
    return make_tiny_llama(layers=2, hidden=64, inter=128)


def tiny_gpt2():
    """HF Conv1D layers: weights stored (in, out), so rows are the stored weight's columns."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def brute_fisher(model, names: list[str], ids: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """sum over batches of the squared batch gradient, summed over each (out, in) row: gradients
    from HF's own causal-LM loss (``labels=ids``), one ``torch.autograd.grad`` per batch."""
    model = copy.deepcopy(model)
    ws = [model.get_submodule(n).weight for n in names]
    conv = [type(model.get_submodule(n)).__name__ == "Conv1D" for n in names]
    out = {n: 0.0 for n in names}
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch]
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, ws)
        for n, g, c in zip(names, grads, conv):
            g = g.double().T if c else g.double()  # (out, in)
            out[n] = out[n] + (g ** 2).sum(1)
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_row_fisher_matches_independent_per_batch_gradients(base, batch):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    model = copy.deepcopy(base)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    got = row_fisher(model, {n: model.get_submodule(n) for n in names}, CALIB, batch)
    ref = brute_fisher(base, names, CALIB, batch)
    for n in names:
        assert got[n].shape == (model.get_submodule(n).out_features,)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=0.0)
        assert float(got[n].min()) > 0
    # the model is left as it was: flags restored, no gradients kept
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_row_fisher_on_conv1d_layers_uses_output_rows():
    model = tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    got = row_fisher(model, {n: model.get_submodule(n) for n in names}, CALIB, 2)
    ref = brute_fisher(model, names, CALIB, 2)
    for n in names:
        assert got[n].shape == (model.get_submodule(n).nf,)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=0.0)


def test_stage_installs_the_factors_of_the_brute_force_fisher(base):
    """What the stage computes inside the run (selection, gradient pass, scaling) is the factorisation
    of diag(sqrt I) W with I from the independent reference; and it beats plain SVD on the
    Fisher-weighted error at the same rank, layer by layer."""
    lm = mp.load(copy.deepcopy(base))
    rep = mp.compress(lm, {"name": "t", "stages": [{"method": "fwsvd", "rank": 8, "batch_size": 2}]},
                      calib=CALIB, progress=False)
    lrs = {n: m for n, m in lm.module.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lrs) == 14 and all(m.rank == 8 for m in lrs.values())
    ref = brute_fisher(base, sorted(lrs), CALIB, 2)
    lm_svd = mp.load(copy.deepcopy(base))
    mp.compress(lm_svd, {"name": "s", "stages": [{"method": "svd", "rank": 8}]}, progress=False)
    for n, m in lrs.items():
        W = base.get_submodule(n).weight.detach()
        f = scaled_factor(W, None, 8, row=fisher_scale(ref[n]))
        torch.testing.assert_close(m.dequantized_weight(), f.B @ f.A, rtol=1e-4, atol=1e-5)
        e_fw = float((ref[n][:, None] * (W.double() - m.dequantized_weight().double()) ** 2).sum())
        Ws = lm_svd.module.get_submodule(n).dequantized_weight().double()
        e_svd = float((ref[n][:, None] * (W.double() - Ws) ** 2).sum())
        assert e_fw < e_svd, n
    notes = {r["name"]: r["notes"] for r in rep["layers"]}
    assert all(any(x.startswith("Fisher-weighted relative error") for x in notes[n]) for n in lrs)
    assert rep["stages"][0]["kind"] == "training"


def test_builtin_recipe_save_reload_identical(base, tmp_path):
    assert load_recipe("fwsvd-r20").stages[0].param_ratio == 0.8
    lm = mp.load(copy.deepcopy(base))
    mp.compress(lm, "fwsvd-r20", calib=CALIB, progress=False)
    lrs = {n: m for n, m in lm.module.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lrs) == 14  # 7 linears x 2 blocks; lm_head ignored
    for n, m in lrs.items():
        out_f, in_f = m.out_features, m.in_features
        assert (out_f + in_f) * m.rank <= 0.8 * out_f * in_f < (out_f + in_f) * (m.rank + 1), n
    mp.save(lm, tmp_path / "out")
    back = mp.load(tmp_path / "out")
    assert torch.equal(logits(lm.module), logits(back.module))


def test_cli_compress_reloads_as_the_api_run(base, tmp_path, capsys):
    """``modelpress compress --recipe fwsvd-r20`` on a saved tiny model: exit 0, and the output folder
    computes exactly what the same recipe gives through the API on the same calibration tokens."""
    from modelpress.cli.main import main
    from tests.robustness.support import rebind_consoles

    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    base.save_pretrained(str(model_dir))
    make_tokenizer(tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, model_dir / f.name)
    text.write_text(TEXT)
    rebind_consoles()
    rc = main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "fwsvd-r20", "--output",
               str(tmp_path / "out"), "--calib", str(text), "--calib-samples", "4", "--calib-seq-len", "32"])
    assert rc == 0, capsys.readouterr().err
    back = mp.load(tmp_path / "out")
    lm = mp.load(str(model_dir))
    mp.compress(lm, "fwsvd-r20", calib=mp.calibration_for(lm, str(text), 4, 32), progress=False)
    assert torch.equal(logits(back.module), logits(lm.module))


def test_without_calibration_refused_in_one_line(base):
    lm = mp.load(copy.deepcopy(base))
    with pytest.raises(ModelpressError, match="calib") as e:
        mp.compress(lm, "fwsvd-r20", calib=None, progress=False)
    assert "\n" not in str(e.value)


def test_encoder_refused_in_one_line():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=64)).eval()
    with pytest.raises(ModelpressError, match="causal language model") as e:
        mp.compress(mp.load(model), "fwsvd-r20", calib=CALIB, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stage,field", [({"method": "fwsvd", "batch_size": 0}, "batch_size"),
                                         ({"method": "fwsvd", "rank": 4, "energy": 0.9}, "energy")])
def test_bad_configs_refused_at_load(stage, field):
    with pytest.raises(ModelpressError, match=field):
        parse_recipe({"stages": [stage]})
