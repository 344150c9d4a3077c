"""Tiny random architectures for the conformance matrix, built in code from transformers' config classes.

To add an architecture, add one ``Arch`` to ``ARCHS``: a name, the config class, the keyword
arguments of a tiny instance and the traits it exercises. Every row of the matrix picks it up.
Hidden 32 (intermediate 64) and two blocks everywhere, so groups of 16/32 tile every linear, except
stablelm (hidden 48, intermediate 80), whose widths groups of 32 do not divide (short last group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 300  # the byte-level BPE tokenizer of tests/conftest.py has 300 ids
SEQ = 32  # positions every tiny model supports at least (calibration and eval windows)


@dataclass(frozen=True)
class Arch:
    """One architecture row: ``config`` names a ``transformers`` config class, ``kwargs`` its tiny instance."""

    name: str
    config: str
    kwargs: dict[str, Any]
    traits: tuple[str, ...] = ()
    encoder: bool = False  # masked-LM encoder (bert): loaded with AutoModelForMaskedLM
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def build_config(self):
        import transformers

        cfg = getattr(transformers, self.config)(**self.kwargs)
        return cfg

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised float32 model in eval mode (same weights every call), whose config
        names its class in ``architectures`` as a checkpoint's does (a config without it, as a GGUF
        file gives, has its own test in ``test_cli.py``)."""
        import transformers

        torch.manual_seed(self.seed)
        auto = transformers.AutoModelForMaskedLM if self.encoder else transformers.AutoModelForCausalLM
        model = auto.from_config(self.build_config())
        model.config.architectures = [type(model).__name__]  # as in a checkpoint's config.json
        _spread_weights(model)
        return model.eval()


def _spread_weights(model: torch.nn.Module) -> None:
    """Give 1-D parameters (norm weights, biases) non-trivial values, deterministically: HF initialises
    them to exactly 1 / 0, which hides scale-folding and bias bugs. Norm weights (the ones HF sets to
    1) become 1 + N(0, 0.1), everything else N(0, 0.1)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if bool((p == 1).all()) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


_DENSE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)

ARCHS: tuple[Arch, ...] = (
    Arch("llama", "LlamaConfig", {**_DENSE, "num_key_value_heads": 2, "tie_word_embeddings": False},
         ("gqa", "untied")),
    Arch("mistral", "MistralConfig", {**_DENSE, "num_key_value_heads": 2, "sliding_window": 16,
                                      "tie_word_embeddings": False}, ("gqa", "sliding_window", "untied")),
    Arch("qwen2", "Qwen2Config", {**_DENSE, "num_key_value_heads": 2, "tie_word_embeddings": True},
         ("gqa", "qkv_bias", "tied")),
    Arch("qwen3", "Qwen3Config", {**_DENSE, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
         ("gqa", "qk_norm", "tied")),
    Arch("gemma2", "Gemma2Config", {**_DENSE, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16,
                                    "tie_word_embeddings": True}, ("gqa", "extra_norms", "softcap", "tied")),
    Arch("phi3", "Phi3Config", {**_DENSE, "num_key_value_heads": 4, "tie_word_embeddings": False,
                                "pad_token_id": 2}, ("mha", "fused_qkv", "fused_gate_up", "untied")),
    Arch("gpt2", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                    bos_token_id=0, eos_token_id=1, tie_word_embeddings=True),
         ("mha", "conv1d", "tied", "learned_positions")),
    Arch("gpt_neox", "GPTNeoXConfig", {**_DENSE, "use_parallel_residual": True, "tie_word_embeddings": False,
                                       "rotary_pct": 0.5}, ("mha", "parallel_attn_mlp", "fused_qkv", "untied")),
    Arch("falcon", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_kv_heads=1, new_decoder_architecture=False, multi_query=True,
                                        parallel_attn=True, bias=False, max_position_embeddings=128,
                                        bos_token_id=0, eos_token_id=1, tie_word_embeddings=True),
         ("mqa", "parallel_attn_mlp", "fused_qkv", "tied")),
    Arch("olmo2", "Olmo2Config", {**_DENSE, "num_key_value_heads": 4, "tie_word_embeddings": False},
         ("mha", "qk_norm", "post_norms", "untied")),
    Arch("mixtral", "MixtralConfig", {**_DENSE, "num_key_value_heads": 2, "num_local_experts": 4,
                                      "num_experts_per_tok": 2, "intermediate_size": 32,
                                      "tie_word_embeddings": False}, ("moe", "gqa", "untied")),
    Arch("qwen3_moe", "Qwen3MoeConfig", {**_DENSE, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
                                         "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                         "decoder_sparse_step": 1, "norm_topk_prob": True,
                                         "tie_word_embeddings": False}, ("moe", "gqa", "qk_norm", "untied")),
    Arch("starcoder2", "Starcoder2Config", {**_DENSE, "num_key_value_heads": 2, "sliding_window": 16,
                                            "use_bias": True, "tie_word_embeddings": True},
         ("gqa", "layernorm", "biases", "gelu_mlp", "tied")),
    Arch("stablelm", "StableLmConfig", {**_DENSE, "hidden_size": 48, "intermediate_size": 80,
                                        "num_attention_heads": 4, "num_key_value_heads": 4, "partial_rotary_factor": 0.5,
                                        "tie_word_embeddings": False}, ("mha", "layernorm", "odd_width", "untied")),
    Arch("opt", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True),
         ("mha", "layernorm", "biases", "learned_positions", "tied")),
    Arch("bert", "BertConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, pad_token_id=2),
         ("encoder", "post_ln", "biases"), encoder=True),
)

BY_NAME = {a.name: a for a in ARCHS}
