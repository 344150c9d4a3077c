"""Every ArchSpec matches a tiny model of its family built in code; RTN and save/load work on each."""
import pytest
import torch

import modelpress as mp
from modelpress.export.saving import load_compressed, save_compressed
from modelpress.models.archspec import detect_spec, get_blocks, role_of
from modelpress.models.layers import named_linears


def _tiny(kind: str):
    import transformers as T

    torch.manual_seed(0)
    if kind == "llama":
        from tests.conftest import make_tiny_llama
        return make_tiny_llama()
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    if kind == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)).eval()
    return T.BertModel(T.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_spec_roles_resolve(kind):
    m = _tiny(kind)
    spec = detect_spec(m)
    assert spec is not None and spec.name == kind
    blocks = get_blocks(m, spec)
    assert len(blocks) == 2
    names = {n for n, _ in named_linears(m)}
    for role in spec.roles:
        hits = [n for n in names if role_of(n, m, spec) == role]
        assert len(hits) == 2, (kind, role, hits)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bert"])
def test_rtn_w8_close_and_round_trip(kind, tmp_path):
    m = _tiny(kind)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref = m(input_ids=ids)[0]
    lm = mp.load(m)
    mp.compress(lm, "rtn-w8", progress=False)
    with torch.no_grad():
        out = lm.module(input_ids=ids)[0]
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    back = load_compressed(save_compressed(lm, tmp_path / kind))
    with torch.no_grad():
        assert torch.equal(back.module(input_ids=ids)[0], out)
