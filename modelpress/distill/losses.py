"""Distillation losses, each a registered config usable alone or mixed with weights in a recipe.

Response (logits):
    ``kd``: ``alpha * T^2 * D(p_T || q_T) + (1 - alpha) * CE`` (Hinton et al. 2015), with ``D`` the
    forward KL, the reverse KL (MiniLLM) or the generalised Jensen-Shannon divergence (GKD);
    teacher logits may be a cached top-k (values + indices, as DistillKit stores them).
Feature:
    ``hidden``: MSE between mapped hidden states, through a learned linear projection where the
    widths differ (TinyBERT / FitNets); ``attention``: MSE between attention maps;
    ``cosine``: DistilBERT's cosine embedding loss on the last hidden states.
Relation (Park et al. 2019, RKD): ``rkd-distance`` and ``rkd-angle`` between examples of a batch.
Sentence embeddings: ``embedding-mse`` (a sentence-transformers student mimics its teacher).
Task (no teacher): ``pair-cosine``, sentence-transformers' CosineSimilarityLoss on sentence pairs
(:class:`~.data.SentencePairs`), so a training stage can fine-tune an encoder on a labelled task.

A loss that reads no teacher output says so with ``reads_teacher = False``: a stage whose losses
all say so runs without the float reference.

Every loss averages over the real tokens (``attention_mask``) and returns a scalar.

Example:
    >>> loss = mixed_loss([{"type": "kd", "temperature": 2.0, "alpha": 0.5}, {"type": "cosine", "weight": 0.1}])
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, SerializeAsAny

from ..core.config import Config, Registry, tagged
from ..core.errors import ModelpressError

LOSSES: Registry[type["LossConfig"]] = Registry("distillation loss", packages=("modelpress.distill",))


@dataclass
class Outputs:
    """What one model produced for a batch; fields a loss does not need may stay None.

    Shapes: ``logits`` (B, T, V); ``topk_values`` / ``topk_indices`` (B, T, k) when only a cached
    top-k of the teacher is known; ``hidden_states`` a tuple of (B, T, D), embeddings first;
    ``attentions`` a tuple of (B, H, T, T); ``embeddings`` (B, D) pooled sentence embeddings.
    """

    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    embeddings: torch.Tensor | None = None


@dataclass
class Batch:
    """Token ids (B, T), the mask of real tokens (B, T) and hard labels (B, T) aligned with the logits
    (position t's target; -100: not scored). Without labels a causal LM's targets are the next tokens.
    ``targets``: one float per example of a task loss, not per token (a sentence pair's similarity,
    (B / 2,) for the pair layout of :class:`~.data.SentencePairs`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    targets: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        return self.attention_mask.bool() if self.attention_mask is not None else torch.ones_like(self.input_ids, dtype=torch.bool)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.input_ids.to(device), move(self.attention_mask), move(self.labels), self.extra,
                     move(self.targets))


class LossConfig(Config, ABC):
    """Base of every distillation loss: a type tag and its weight in a mix; ``reads_teacher``
    False for a loss computed from the student and the batch alone (hard labels, task targets)."""

    type: str
    weight: float = Field(1.0, ge=0)
    reads_teacher: ClassVar[bool] = True

    def build(self, student_dims: dict[str, int], teacher_dims: dict[str, int]) -> "LossModule":
        """The loss as a module (it may own learned parameters, e.g. a projection)."""
        return LossModule(self)

    @abstractmethod
    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: "LossModule") -> torch.Tensor:
        """The loss value (scalar) of one batch."""


class LossModule(nn.Module):
    """A built loss: holds its config and any learned parameters, so they train with the student."""

    def __init__(self, cfg: LossConfig, **params: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.extra = nn.ModuleDict(params)

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
        return self.cfg.compute(s, t, batch, self)


LossField = Annotated[SerializeAsAny[LossConfig], BeforeValidator(tagged(LOSSES, "type"))]


# ---- response ------------------------------------------------------------------------------------
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T) over ``mask`` (B, T) (0 when nothing is masked in)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _shifted(batch: Batch) -> torch.Tensor:
    """Tokens that have a next token to predict: the mask without each row's last real position."""
    mask = batch.mask().clone()
    mask[:, -1] = False
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = batch.mask()[:, 1:]
    return mask & nxt


def teacher_distribution(t: Outputs, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher probabilities at ``temperature``: full (B, T, V) with indices None, or renormalised
    over its cached top-k (B, T, k) with their vocabulary indices."""
    if t.logits is not None:
        return F.softmax(t.logits.float() / temperature, dim=-1), None
    if t.topk_values is None or t.topk_indices is None:
        raise ModelpressError("kd needs the teacher's logits or a cached top-k of them")
    return F.softmax(t.topk_values.float() / temperature, dim=-1), t.topk_indices


def divergence(p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence (B, T) between teacher ``p`` and student ``q = exp(log_q)`` over the
    last axis: forward KL(p||q), reverse KL(q||p) or generalised JSD with weight ``beta`` on p."""
    log_p = torch.log(p.clamp_min(1e-30))
    q = log_q.exp()
    if kind == "forward":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    log_m = torch.log(m.clamp_min(1e-30))
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


@LOSSES.register("kd")
class KDLoss(LossConfig):
    """Soft targets: ``alpha * T^2 * D(p_T || q_T) + (1 - alpha) * CE(labels)``.

    The ``T^2`` factor keeps the soft term's gradient on the scale of the hard term's as T grows
    (Hinton et al.). With a cached top-k teacher the divergence runs over those k tokens (teacher
    renormalised, student log-probabilities of the full vocabulary gathered there).
    """

    type: Literal["kd"] = "kd"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: weight of the teacher in the mixture")

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        T = self.temperature
        mask = _shifted(batch) if batch.labels is None else batch.labels.ne(-100) & batch.mask()
        p, idx = teacher_distribution(t, T)
        log_q = F.log_softmax(s.logits.float() / T, dim=-1)  # (B, T, V)
        if idx is not None:
            log_q = log_q.gather(-1, idx)
            log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)  # the student renormalised too
        soft = T * T * _masked_mean(divergence(p, log_q, self.divergence, self.beta), mask)
        if self.alpha == 1.0:
            return soft
        return self.alpha * soft + (1 - self.alpha) * hard_ce(s.logits, batch)


def hard_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy on the real tokens (or on ``batch.labels`` when given, aligned)."""
    if batch.labels is not None:
        tgt = batch.labels.masked_fill(~batch.mask(), -100)
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
    mask = _shifted(batch)
    tgt = torch.roll(batch.input_ids, -1, dims=1).masked_fill(~mask, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)


@LOSSES.register("ce")
class CELoss(LossConfig):
    """Hard-label cross-entropy alone (the no-teacher baseline, or a term in a mix)."""

    type: Literal["ce"] = "ce"
    reads_teacher: ClassVar[bool] = False

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        return hard_ce(s.logits, batch)


# ---- feature -------------------------------------------------------------------------------------
def uniform_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Student hidden-state index -> teacher index, spread evenly (index 0: embeddings; last: last).

    Example:
        >>> uniform_layer_map(3, 6)
        {0: 0, 1: 2, 2: 4, 3: 6}
    """
    return {i: round(i * n_teacher / n_student) for i in range(n_student + 1)}


class MappedLoss(LossConfig):
    """Losses over pairs of (student layer, teacher layer) given by ``layer_map`` ("uniform": evenly)."""

    layer_map: dict[int, int] | Literal["uniform"] = "uniform"

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        mp = uniform_layer_map(n_student, n_teacher) if self.layer_map == "uniform" else self.layer_map
        for si, ti in mp.items():
            if not (0 <= si <= n_student and 0 <= ti <= n_teacher):
                raise ModelpressError(f"{self.type}: layer map {si}->{ti} names a layer that does not exist "
                                      f"(student has {n_student} layers, teacher {n_teacher})")
        return sorted(mp.items())


@LOSSES.register("hidden")
class HiddenStateLoss(MappedLoss):
    """MSE between mapped hidden states; a learned linear projection when the widths differ."""

    type: Literal["hidden"] = "hidden"

    def build(self, student_dims: dict[str, int], teacher_dims: dict[str, int]) -> LossModule:
        ds, dt = student_dims["hidden"], teacher_dims["hidden"]
        return LossModule(self, proj=nn.Linear(ds, dt, bias=False)) if ds != dt else LossModule(self)

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        hs, ht = s.hidden_states, t.hidden_states
        proj = module.extra["proj"] if "proj" in module.extra else nn.Identity()
        mask = batch.mask()
        terms = [_masked_mean((proj(hs[a]).float() - ht[b].float()).pow(2).mean(-1), mask)
                 for a, b in self.pairs(len(hs) - 1, len(ht) - 1)]
        return torch.stack(terms).mean()


@LOSSES.register("attention")
class AttentionLoss(MappedLoss):
    """MSE between mapped attention maps (B, H, T, T), averaged over heads when the counts differ."""

    type: Literal["attention"] = "attention"

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        if not s.attentions or not t.attentions:
            raise ModelpressError("attention loss needs attention maps (run the models with output_attentions)")
        terms = []
        for a, b in self.pairs(len(s.attentions), len(t.attentions)):
            if a == 0 or b == 0:
                continue  # index 0 is the embeddings in the hidden-state numbering; maps start at layer 1
            sa, ta = s.attentions[a - 1].float(), t.attentions[b - 1].float()
            if sa.shape[1] != ta.shape[1]:
                sa, ta = sa.mean(1, keepdim=True), ta.mean(1, keepdim=True)
            terms.append((sa - ta).pow(2).sum(-1).mean(1).masked_select(batch.mask()).mean())
        return torch.stack(terms).mean()


@LOSSES.register("cosine")
class CosineLoss(LossConfig):
    """DistilBERT's cosine embedding loss: ``1 - cos(h_s, h_t)`` of the last hidden states per token."""

    type: Literal["cosine"] = "cosine"

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        cos = F.cosine_similarity(s.hidden_states[-1].float(), t.hidden_states[-1].float(), dim=-1)  # (B, T)
        return _masked_mean(1 - cos, batch.mask())


# ---- relation and sentence embeddings ------------------------------------------------------------
def pooled(o: Outputs, batch: Batch) -> torch.Tensor:
    """Sentence embeddings (B, D): given ones, else the masked mean of the last hidden states."""
    if o.embeddings is not None:
        return o.embeddings.float()
    m = batch.mask().unsqueeze(-1).float()
    return (o.hidden_states[-1].float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _pdist(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, B) normalised by their mean over distinct pairs (RKD's psi_D)."""
    d = torch.cdist(e, e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


@LOSSES.register("rkd-distance")
class RKDDistanceLoss(LossConfig):
    """RKD distance: Huber loss between the normalised pairwise distances of student and teacher."""

    type: Literal["rkd-distance"] = "rkd-distance"

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        ds, dt = _pdist(pooled(s, batch)), _pdist(pooled(t, batch))
        off = ~torch.eye(len(ds), dtype=torch.bool, device=ds.device)
        return F.smooth_l1_loss(ds[off], dt[off])


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k, for every triplet: (B, B, B) (RKD's psi_A)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=-1)  # (B, B, D): unit vector from i to j
    return torch.einsum("ijd,kjd->ijk", diff, diff)


@LOSSES.register("rkd-angle")
class RKDAngleLoss(LossConfig):
    """RKD angle: Huber loss between the angles the triplets of a batch form, student vs teacher."""

    type: Literal["rkd-angle"] = "rkd-angle"

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        return F.smooth_l1_loss(_angles(pooled(s, batch)), _angles(pooled(t, batch)))


@LOSSES.register("embedding-mse")
class EmbeddingMSELoss(LossConfig):
    """MSE between student and teacher sentence embeddings (sentence-transformers' distillation),
    through a learned projection when the widths differ."""

    type: Literal["embedding-mse"] = "embedding-mse"

    def build(self, student_dims: dict[str, int], teacher_dims: dict[str, int]) -> LossModule:
        ds, dt = student_dims["hidden"], teacher_dims["hidden"]
        return LossModule(self, proj=nn.Linear(ds, dt, bias=False)) if ds != dt else LossModule(self)

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        es = pooled(s, batch)
        if "proj" in module.extra:
            es = module.extra["proj"](es)
        return F.mse_loss(es, pooled(t, batch))


# ---- task losses (no teacher) --------------------------------------------------------------------
@LOSSES.register("pair-cosine")
class PairCosineLoss(LossConfig):
    """sentence-transformers' CosineSimilarityLoss: ``MSE(cos(u_i, v_i), y_i)`` over the pairs of a
    batch, with ``u``, ``v`` the mean-pooled embeddings of the two sentences and ``y`` the pair's
    target (STS-B: gold score / 5). The batch holds the pairs' first sentences in its first half and
    their second sentences in its second half (:class:`~.data.SentencePairs`), so each sentence is
    encoded on its own (a bi-encoder), and ``batch.targets`` (B / 2,) the targets.

    Example:
        >>> mixed_loss([{"type": "pair-cosine"}])  # doctest: +SKIP
    """

    type: Literal["pair-cosine"] = "pair-cosine"
    reads_teacher: ClassVar[bool] = False

    def compute(self, s: Outputs, t: Outputs, batch: Batch, module: LossModule) -> torch.Tensor:
        if batch.targets is None or 2 * len(batch.targets) != len(batch.input_ids):
            raise ModelpressError("pair-cosine needs sentence pairs: a batch of 2P sentences (first sentences, then "
                                  "second ones) with P targets (train on modelpress.distill.data.SentencePairs)")
        e = pooled(s, batch)  # (2P, D)
        u, v = e.chunk(2)  # (P, D) each
        return F.mse_loss(F.cosine_similarity(u, v, dim=-1), batch.targets.float())


# ---- mixing --------------------------------------------------------------------------------------
class MixedLoss(nn.Module):
    """``sum(weight_i * loss_i)`` over built losses; ``parts`` keeps the last value of each term."""

    def __init__(self, losses: list[LossModule]) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.parts: dict[str, float] = {}

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> torch.Tensor:
        total = torch.zeros((), device=batch.input_ids.device)
        for lm in self.losses:
            v = lm(s, t, batch)
            if not torch.isfinite(v):
                raise ModelpressError(f"distillation loss {lm.cfg.type!r} is {float(v)} (diverged?)")
            self.parts[lm.cfg.type] = float(v.detach())
            total = total + lm.cfg.weight * v
        return total


def mixed_loss(configs: list[LossConfig | dict], student_dims: dict[str, int] | None = None,
               teacher_dims: dict[str, int] | None = None) -> MixedLoss:
    """Build a :class:`MixedLoss` from configs (or ``{"type": ...}`` dicts)."""
    cfgs = [c if isinstance(c, LossConfig) else tagged(LOSSES, "type")(c) for c in configs]
    if not cfgs:
        raise ModelpressError("distillation needs at least one loss")
    dims_s, dims_t = student_dims or {"hidden": 0}, teacher_dims or {"hidden": 0}
    return MixedLoss([c.build(dims_s, dims_t) for c in cfgs])


def needs(configs: list[LossConfig]) -> dict[str, bool]:
    """Which teacher/student outputs the losses read (so nothing else is computed or cached)."""
    types = {c.type for c in configs}
    return {"logits": bool(types & {"kd", "ce"}), "hidden_states": bool(types & {"hidden", "cosine", "rkd-distance",
                                                                                  "rkd-angle", "embedding-mse",
                                                                                  "pair-cosine"}),
            "attentions": "attention" in types}

