"""Architecture knowledge as data.

An :class:`ArchSpec` says where the decoder blocks are, which linear plays which role, which
norms feed which linears (for smoothing / AWQ scale folding) and the order in which a block's
linears are calibrated. Algorithms read roles from here and never test a model's class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class ShapeKeys:
    """Where a model records its sizes: HF config keys, plus attributes its attention modules cache.

    Structured pruning rewrites these so the model runs, saves and reloads at its smaller size.
    A key set to None means the architecture cannot represent that size changing (OPT derives the
    head width from ``hidden_size / num_heads``, so its heads cannot be pruned).
    """

    heads: str | None = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str | None = "head_dim"  # written explicitly: hidden_size // heads no longer holds
    intermediate: str | None = "intermediate_size"
    layers: str = "num_hidden_layers"
    attn_groups_attr: str | None = "num_key_value_groups"  # query heads per KV head, cached by attention
    layer_index_attr: str = "layer_idx"  # blocks' KV-cache slot, renumbered when layers are removed
    per_layer: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer


@dataclass(frozen=True)
class MoESpec:
    """Where a block's mixture of experts lives: a linear router and experts fused along axis 0.

    Example:
        >>> MIXTRAL.moe.expert_params
        ('gate_up_proj', 'down_proj')
    """

    router: str  # path inside a block; its ``weight`` is (num_experts, hidden), one row per expert
    experts: str  # path inside a block of the module holding every expert's weights
    expert_params: tuple[str, ...]  # parameters of ``experts`` stacked on axis 0 (one slice per expert)
    num_experts_key: str  # config key: experts per layer
    top_k_key: str  # config key: experts chosen per token
    count_attrs: tuple[str, ...] = ("num_experts",)  # attributes of router / experts caching the count


@dataclass(frozen=True)
class ArchSpec:
    """Data describing one architecture family.

    Example:
        >>> LLAMA.roles["down_proj"]
        'mlp.down_proj'
    """

    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]  # candidate dotted paths of the ModuleList of blocks
    embed: tuple[str, ...]
    final_norm: tuple[str, ...] = ()
    lm_head: str | None = None
    roles: dict[str, str] = field(default_factory=dict)  # role -> path inside a block
    norms: dict[str, str] = field(default_factory=dict)  # norm role -> path inside a block
    # (previous op inside the block, roles it feeds): scales can be folded into the previous op
    scale_mappings: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # calibration order inside a block (true-sequential): later groups see earlier ones quantised
    sequential: tuple[tuple[str, ...], ...] = ()
    # the weight of these layers is stored (in, out) (HF Conv1D) rather than nn.Linear's (out, in)
    transposed: bool = False
    # mixture-of-experts layout (None: dense MLP)
    moe: MoESpec | None = None
    # config keys holding the sizes structured pruning changes (None: not supported)
    shapes: ShapeKeys | None = None
    # projection role -> path inside a block of a norm applied to its output (QK-norm). One as wide
    # as the projection (OLMo-2) loses the rows of removed heads; one per head (Qwen3) is unchanged.
    head_norms: dict[str, str] = field(default_factory=dict)


_LLAMA_ROLES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}

LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2"),
    blocks=("model.layers", "layers"),
    embed=("model.embed_tokens", "embed_tokens"),
    final_norm=("model.norm", "norm"),
    lm_head="lm_head",
    roles=_LLAMA_ROLES,
    norms={"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"},
    scale_mappings=(
        ("input_norm", ("q_proj", "k_proj", "v_proj")),
        ("v_proj", ("o_proj",)),
        ("post_attention_norm", ("gate_proj", "up_proj")),
        ("up_proj", ("down_proj",)),
    ),
    sequential=(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
    shapes=ShapeKeys(),
    head_norms={"q_proj": "self_attn.q_norm", "k_proj": "self_attn.k_norm"},
)

PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    blocks=("model.layers", "layers"),
    embed=("model.embed_tokens", "embed_tokens"),
    final_norm=("model.norm", "norm"),
    lm_head="lm_head",
    # q/k/v and gate/up are fused into one linear each
    roles={"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_up_proj",
           "down_proj": "mlp.down_proj"},
    norms={"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"},
    scale_mappings=(("input_norm", ("qkv_proj",)), ("post_attention_norm", ("gate_up_proj",))),
    sequential=(("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)),
    shapes=ShapeKeys(),  # whole layers only: heads and neurons sit inside the fused linears
)

STABLELM = ArchSpec(
    name="stablelm",
    model_types=("stablelm",),
    blocks=("model.layers", "layers"),
    embed=("model.embed_tokens", "embed_tokens"),
    final_norm=("model.norm", "norm"),
    lm_head="lm_head",
    roles=_LLAMA_ROLES,
    norms={"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"},
    scale_mappings=LLAMA.scale_mappings,
    sequential=LLAMA.sequential,
    # its attention derives the head width from hidden_size / num_attention_heads: heads cannot go
    shapes=ShapeKeys(heads=None, kv_heads=None, head_dim=None, attn_groups_attr=None),
)

GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    blocks=("transformer.h", "h"),
    embed=("transformer.wte", "wte"),
    final_norm=("transformer.ln_f", "ln_f"),
    lm_head="lm_head",
    roles={"qkv_proj": "attn.c_attn", "o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"},
    norms={"input_norm": "ln_1", "post_attention_norm": "ln_2"},
    scale_mappings=(("input_norm", ("qkv_proj",)), ("post_attention_norm", ("up_proj",))),
    sequential=(("qkv_proj",), ("o_proj",), ("up_proj",), ("down_proj",)),
    transposed=True,
)

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    blocks=("model.decoder.layers", "decoder.layers"),
    embed=("model.decoder.embed_tokens", "decoder.embed_tokens"),
    final_norm=("model.decoder.final_layer_norm", "decoder.final_layer_norm"),
    lm_head="lm_head",
    roles={
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.out_proj", "up_proj": "fc1", "down_proj": "fc2",
    },
    norms={"input_norm": "self_attn_layer_norm", "post_attention_norm": "final_layer_norm"},
    scale_mappings=(
        ("input_norm", ("q_proj", "k_proj", "v_proj")),
        ("v_proj", ("o_proj",)),
        ("post_attention_norm", ("up_proj",)),
    ),
    sequential=(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("up_proj",), ("down_proj",)),
)

BERT = ArchSpec(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta"),
    blocks=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "0.auto_model.encoder.layer"),
    embed=("embeddings.word_embeddings", "bert.embeddings.word_embeddings"),
    roles={
        "q_proj": "attention.self.query", "k_proj": "attention.self.key", "v_proj": "attention.self.value",
        "o_proj": "attention.output.dense", "up_proj": "intermediate.dense", "down_proj": "output.dense",
    },
    norms={"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"},
    # post-LN blocks: only the value -> output mapping is a pure linear chain
    scale_mappings=(("v_proj", ("o_proj",)),),
    sequential=(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("up_proj",), ("down_proj",)),
    # whole layers can go (students of half depth); heads and MLP widths are not wired for BERT
    shapes=ShapeKeys(heads=None, kv_heads=None, head_dim=None, intermediate=None, attn_groups_attr=None),
)

MIXTRAL = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    blocks=("model.layers", "layers"),
    embed=("model.embed_tokens", "embed_tokens"),
    final_norm=("model.norm", "norm"),
    lm_head="lm_head",
    roles={r: p for r, p in _LLAMA_ROLES.items() if p.startswith("self_attn.")},
    norms={"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"},
    scale_mappings=(("input_norm", ("q_proj", "k_proj", "v_proj")), ("v_proj", ("o_proj",))),
    sequential=(("q_proj", "k_proj", "v_proj"), ("o_proj",)),
    moe=MoESpec(router="mlp.gate", experts="mlp.experts", expert_params=("gate_up_proj", "down_proj"),
                num_experts_key="num_local_experts", top_k_key="num_experts_per_tok"),
)

ARCH_SPECS: tuple[ArchSpec, ...] = (LLAMA, GPT2, OPT, BERT, MIXTRAL, PHI3, STABLELM)


def spec_for_model_type(model_type: str | None) -> ArchSpec | None:
    """The spec whose ``model_types`` contains ``model_type`` (None when unknown)."""
    for spec in ARCH_SPECS:
        if model_type in spec.model_types:
            return spec
    return None


def detect_spec(model: nn.Module) -> ArchSpec | None:
    """Spec for ``model`` from its HF config's ``model_type``, else by finding a known block path."""
    cfg = getattr(model, "config", None)
    spec = spec_for_model_type(getattr(cfg, "model_type", None))
    if spec is not None:
        return spec
    names = {n for n, _ in model.named_modules()}
    for spec in ARCH_SPECS:
        if any(p in names for p in spec.blocks) and any(
            f"{p}.0.{r}" in names for p in spec.blocks for r in spec.roles.values()
        ):
            return spec
    return None


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    """``model.get_submodule(path)`` returning None when absent."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def blocks_path(model: nn.Module, spec: ArchSpec) -> str | None:
    """The first of ``spec.blocks`` that exists in ``model``."""
    for p in spec.blocks:
        if isinstance(get_submodule(model, p), nn.ModuleList):
            return p
    return None


def get_blocks(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """The decoder (or encoder) blocks, in order."""
    p = blocks_path(model, spec)
    return list(get_submodule(model, p)) if p else []


def role_of(name: str, model: nn.Module, spec: ArchSpec | None) -> str | None:
    """Role of the module called ``name`` (e.g. 'model.layers.3.mlp.down_proj' -> 'down_proj')."""
    if spec is None:
        return None
    bp = blocks_path(model, spec)
    if bp is None or not name.startswith(bp + "."):
        return "lm_head" if spec.lm_head == name else None
    rest = name[len(bp) + 1:].split(".", 1)
    if len(rest) != 2:
        return None
    for role, path in spec.roles.items():
        if path == rest[1]:
            return role
    return None
