"""The sequential engine: resume after interruption is bit-identical; low-memory loading matches."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.api import as_recipe
from modelpress.pipeline import sequential
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama

RECIPE = {"name": "t", "stages": [{"method": "gptq", "act_order": True,
                                   "format": {"type": "int", "bits": 3, "granularity": 32}}]}


def _packed(model):
    return {f"{n}.{k}": getattr(m, k).clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for k in m._tensor_names}


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(0)
    return torch.randint(0, 300, (6, 32))


@pytest.mark.parametrize("offload", [False, True], ids=["in-ram", "on-disk"])
def test_interrupted_run_resumes_bit_identical(tmp_path, calib, monkeypatch, offload):
    """On disk the activation cache is checkpointed and restored batch by batch (2 samples a batch here)."""
    from modelpress.calib import blocks

    monkeypatch.setattr(blocks, "FORWARD_TOKENS_ON_DISK", 2 * calib.shape[1])
    base = make_tiny_llama(seed=5, layers=4)
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, RECIPE, calib=calib, progress=False)

    lm = mp.load(copy.deepcopy(base))
    real = sequential.run_sequential

    def crash_at_block_2(*a, **kw):
        def before(i):
            if i == 2:
                raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs
        return real(*a, **{**kw, "before_block": before})

    monkeypatch.setattr(sequential, "run_sequential", crash_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        mp.apply(lm, RECIPE, calib=calib, progress=False, workdir=tmp_path / "work", offload_activations=offload)
    assert (tmp_path / "work" / "modelpress-run" / "state.json").exists()
    monkeypatch.setattr(sequential, "run_sequential", real)

    fresh = mp.load(copy.deepcopy(base))  # a new process would start from the float model again
    ctx = mp.apply(fresh, RECIPE, calib=calib, progress=False, workdir=tmp_path / "work", offload_activations=offload)
    assert any("resumed from checkpoint after block 1" in w for w in ctx.warnings)
    a, b = _packed(ref.module), _packed(fresh.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "work").iterdir()) == []  # the run's own folder removed after success


@pytest.mark.parametrize("change", ["code", "calibration"])
def test_checkpoint_from_other_code_or_tokens_is_not_reused(tmp_path, calib, monkeypatch, change):
    base = make_tiny_llama(seed=5, layers=3)
    lm = mp.load(copy.deepcopy(base))
    real = sequential.run_sequential

    def crash_at_block_1(*a, **kw):
        def before(i):
            if i == 1:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "before_block": before})

    monkeypatch.setattr(sequential, "run_sequential", crash_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        mp.apply(lm, RECIPE, calib=calib, progress=False, workdir=tmp_path / "work")
    monkeypatch.setattr(sequential, "run_sequential", real)
    calib2 = calib
    if change == "code":  # as after an upgrade or a local edit of the algorithm
        monkeypatch.setattr(sequential, "code_fingerprint", lambda: "other-code")
    else:  # same shape, other tokens
        calib2 = calib.flip(0)
    fresh = mp.load(copy.deepcopy(base))
    ctx = mp.apply(fresh, RECIPE, calib=calib2, progress=False, workdir=tmp_path / "work")
    assert not any("resumed from checkpoint" in w for w in ctx.warnings)
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, RECIPE, calib=calib2, progress=False)
    a, b = _packed(ref.module), _packed(fresh.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_low_memory_load_gives_identical_result(tmp_path, calib):
    base = make_tiny_llama(seed=6, layers=3)
    base.save_pretrained(str(tmp_path / "m"))
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, RECIPE, calib=calib, progress=False)
    lazy = mp.load(str(tmp_path / "m"), low_memory=True)
    assert lazy.module.model.layers[2].mlp.down_proj.weight.is_meta
    mp.apply(lazy, RECIPE, calib=calib, progress=False)
    a, b = _packed(ref.module), _packed(lazy.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 300, (1, 20))
    assert torch.equal(ref.module(input_ids=ids).logits, lazy.module(input_ids=ids).logits)



def test_low_memory_offloads_blocks_and_streams_the_save(tmp_path, calib):
    base = make_tiny_llama(seed=8, layers=3)
    base.save_pretrained(str(tmp_path / "m"))
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, RECIPE, calib=calib, progress=False)
    lazy = mp.load(str(tmp_path / "m"), low_memory=True)
    mp.apply(lazy, RECIPE, calib=calib, progress=False, workdir=tmp_path / "work")
    assert sorted(lazy.lazy.offloaded) == [0, 1, 2]  # compressed blocks left RAM for the checkpoint files
    assert lazy.module.model.layers[1].mlp.down_proj.qweight.is_meta
    out = mp.save(lazy, tmp_path / "out")
    assert (out / "model.safetensors.index.json").exists() and not (tmp_path / "work").exists()
    back = mp.load(str(out))
    a, b = _packed(ref.module), _packed(back.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stages", [[{"method": "wanda", "sparsity": 0.5}],
                                    [{"method": "wanda", "sparsity": 0.5}, {"method": "block-error"}]],
                         ids=["wanda", "wanda+block-error"])
def test_low_memory_pruning_and_float_reference_stream_the_save(tmp_path, calib, stages):
    """Offloaded SparseLayers save from their checkpoints; the float reference reads the source files."""
    base = make_tiny_llama(seed=9, layers=3)
    base.save_pretrained(str(tmp_path / "m"))
    recipe = {"name": "p", "stages": stages}
    ref = mp.load(copy.deepcopy(base))
    rep_ref = mp.compress(ref, recipe, calib=calib, progress=False)
    lazy = mp.load(str(tmp_path / "m"), low_memory=True)
    rep = mp.compress(lazy, recipe, calib=calib, progress=False, workdir=tmp_path / "work")
    back = mp.load(str(mp.save(lazy, tmp_path / "out")))
    ids = torch.randint(0, 300, (1, 20))
    assert torch.equal(ref.module(input_ids=ids).logits, back.module(input_ids=ids).logits)
    errs = lambda r: [x["out_rel_error"] for x in r["layers"] if x["method"] == "block-error"]  # noqa: E731
    assert errs(rep) == errs(rep_ref) and all(e > 0 for e in errs(rep))
    assert not (tmp_path / "work").exists()


def test_offloaded_activation_cache_gives_identical_result(tmp_path, calib):
    base = make_tiny_llama(seed=9, layers=2)
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, RECIPE, calib=calib, progress=False)
    off = mp.load(copy.deepcopy(base))
    mp.apply(off, RECIPE, calib=calib, progress=False, workdir=tmp_path / "w", offload_activations=True)
    a, b = _packed(ref.module), _packed(off.module)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_true_sequential_replays_submodules_with_identical_result(calib, monkeypatch):
    """q/k/v -> o and gate/up -> down replay the attention / MLP from recorded inputs: same codes, fewer block calls."""
    from modelpress.calib import observed

    def run(max_bytes):
        monkeypatch.setattr(observed, "REPLAY_MAX_BYTES", max_bytes)
        lm = mp.load(make_tiny_llama(seed=11, layers=2))
        calls = []
        for blk in lm.module.model.layers:
            blk.register_forward_pre_hook(lambda *_: calls.append(1))
        mp.apply(lm, RECIPE, calib=calib, progress=False)
        return _packed(lm.module), len(calls)

    (a, n_replay), (b, n_full) = run(2 << 30), run(0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n_batches = 1  # 6 samples x 32 tokens fit one ~4k-token batch
    # without replay: 4 group passes + 1 propagation per block; with it: 2 + 1 (capture calls excluded)
    assert n_full - n_replay == 2 * 2 * n_batches


def test_on_disk_cache_replays_from_spilled_inputs_with_identical_result(tmp_path, calib, monkeypatch):
    """With the cache on disk (low memory), replay records its inputs and known outputs in spill files
    beside the cache: the same codes and the same block calls as the in-RAM replay, over several
    batches, and no spill file left behind."""
    from modelpress.calib import blocks, observed

    monkeypatch.setattr(blocks, "FORWARD_TOKENS_ON_DISK", 64)  # 2 samples a batch: 3 batches
    monkeypatch.setattr(blocks, "FORWARD_TOKENS", 64)
    spills = []
    real = blocks.Spill.put

    def put(self, b, t):
        spills.append(self.path)
        return real(self, b, t)

    monkeypatch.setattr(blocks.Spill, "put", put)

    def run(offload, replay=True):
        monkeypatch.setattr(observed, "REPLAY_MAX_BYTES", 2 << 30 if replay else 0)
        lm = mp.load(make_tiny_llama(seed=11, layers=2))
        calls = []
        for blk in lm.module.model.layers:
            blk.register_forward_pre_hook(lambda *_: calls.append(1))
        work = tmp_path / f"w{offload}{replay}"
        mp.apply(lm, RECIPE, calib=calib, progress=False, workdir=work, offload_activations=offload)
        return _packed(lm.module), len(calls), work

    (a, n_ram, _), (b, n_disk, work), (_, n_full, _) = run(False), run(True), run(False, replay=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert n_disk == n_ram < n_full  # the on-disk run replays as the in-RAM one does
    assert any(".replay" in p for p in spills) and any(".known" in p for p in spills)
    import gc
    gc.collect()
    assert not work.exists() or not any(work.rglob("*.replay*")) and not any(work.rglob("*.known*"))
