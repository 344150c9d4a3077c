"""A task loss for training stages: ``pair-cosine`` (sentence-transformers' CosineSimilarityLoss) on
:class:`SentencePairs`. The loss equals a hand-written bi-encoder reference (each sentence encoded
alone, unpadded); the pair layout of a batch is right; a stage whose losses read no teacher needs
no float reference; gradual and movement pruning train an encoder on it to exactly their target."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.core.method import METHODS, StageContext
from modelpress.distill.data import SentencePairs, sentence_pairs
from modelpress.core.config import tagged
from modelpress.distill.losses import LOSSES, CELoss, EmbeddingMSELoss, PairCosineLoss, mixed_loss, needs
from modelpress.distill.recover import train_against_reference, uses_teacher
from modelpress.distill.teacher import model_outputs
from modelpress.distill.trainer import TrainConfig, TrainData
from modelpress.sparsity.layer import SparseLayer
from tests.conftest import make_tokenizer


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


def pairs(n: int = 12, width: int = 10, seed: int = 0) -> SentencePairs:
    """n random pairs, sentences of 2..width tokens right-padded with 0, scores in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (2 * n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (2n, width)
    ids = torch.randint(3, 300, (2 * n, width), generator=g) * mask
    return SentencePairs(ids, mask, trim_padding=True, scores=torch.rand(n, generator=g))


def mean_pooled_alone(model, ids: torch.Tensor) -> torch.Tensor:
    """One sentence, no padding: the mean of its last hidden states (D,)."""
    return model(input_ids=ids[None]).last_hidden_state[0].mean(0)


def test_pair_cosine_equals_a_hand_written_bi_encoder():
    model, data = tiny_bert(), pairs()
    idx = torch.tensor([3, 0, 7, 5])
    batch = data.batch(idx)
    cfg = PairCosineLoss()
    with torch.no_grad():
        got = mixed_loss([cfg])(model_outputs(model, batch, needs([cfg])), None, batch)
        n = len(data)
        cos = []
        for i in idx.tolist():
            a, b = (data.input_ids[r][data.attention_mask[r].bool()] for r in (i, n + i))
            cos.append(F.cosine_similarity(mean_pooled_alone(model, a), mean_pooled_alone(model, b), dim=0))
        want = ((torch.stack(cos) - data.scores[idx]) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert want.item() > 1e-3  # not trivially zero


def test_sentence_pairs_batch_lays_out_first_then_second_sentences():
    data = pairs(n=6, width=8)
    idx = torch.tensor([4, 1])
    b = data.batch(idx)
    rows = torch.tensor([4, 1, 10, 7])
    width = int(data.attention_mask[rows].sum(1).max())  # trimmed to the longest of these four
    assert torch.equal(b.input_ids, data.input_ids[rows, :width])
    assert torch.equal(b.attention_mask, data.attention_mask[rows, :width])
    assert torch.equal(b.targets, data.scores[idx]) and torch.equal(b.extra["index"], idx)
    assert b.labels is None
    assert len(data) == 6 and data.tokens(idx) == int(data.attention_mask[rows].sum())
    moved = b.to("cpu")
    assert torch.equal(moved.targets, b.targets)


def test_sentence_pairs_tokenises_with_the_models_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path)
    tok.pad_token = "</s>"
    tok.save_pretrained(str(tmp_path))
    tiny_bert().save_pretrained(str(tmp_path))
    lm = mp.load(str(tmp_path))
    data = sentence_pairs(lm, ["the robot", "a cat counted the birds"], ["the cat", "birds"], [0.2, 0.9])
    assert len(data) == 2 and data.input_ids.shape[0] == 4
    assert torch.equal(data.input_ids[1][data.attention_mask[1].bool()],
                       torch.tensor(tok("a cat counted the birds")["input_ids"]))
    with pytest.raises(ModelpressError, match="same number"):
        sentence_pairs(lm, ["a"], ["b", "c"], [0.1])


def test_bad_pair_input_is_refused():
    with pytest.raises(ModelpressError, match="one score per pair"):
        SentencePairs(torch.ones(4, 3, dtype=torch.long), scores=torch.rand(3))
    with pytest.raises(ModelpressError, match="one score per pair"):
        SentencePairs(torch.ones(4, 3, dtype=torch.long))
    plain = TrainData(torch.ones(4, 3, dtype=torch.long)).batch(torch.arange(4))
    with pytest.raises(ModelpressError, match="needs sentence pairs"):
        PairCosineLoss().compute(None, None, plain, None)


def test_a_task_loss_alone_needs_no_reference():
    assert not uses_teacher([PairCosineLoss()]) and not uses_teacher([CELoss()])
    assert uses_teacher([PairCosineLoss(), EmbeddingMSELoss()]) and uses_teacher("auto")
    assert isinstance(tagged(LOSSES, "type")({"type": "pair-cosine"}), PairCosineLoss)
    for method in ("gradual", "movement", "recover"):
        entry = METHODS.get(method)
        cfg = entry.config(losses=[{"type": "pair-cosine"}], train={"steps": 4})
        assert not entry.uses_reference(cfg)
        assert entry.uses_reference(entry.config(train={"steps": 4}))  # "auto": distils the reference


def test_dense_training_on_the_task_loss_lowers_it():
    lm, data = mp.load(tiny_bert(seed=1)), pairs(n=8, seed=2)
    cfg = PairCosineLoss()
    batch = data.batch(torch.arange(len(data)))

    def loss() -> float:
        with torch.no_grad():
            return float(mixed_loss([cfg])(model_outputs(lm.module, batch, needs([cfg])), None, batch))

    before = loss()
    res = train_against_reference(lm, StageContext(train=data), [cfg], TrainConfig(steps=30, batch_size=8, lr=3e-3),
                                  name="dense", signature={})
    assert res.steps == 30 and res.tokens == 30 * int(data.attention_mask.sum())
    assert loss() < 0.5 * before


@pytest.mark.parametrize("stage", [{"method": "gradual"}, {"method": "movement", "variant": "hard"}])
def test_pruning_an_encoder_on_the_task_loss_reaches_the_target(stage):
    lm, data = mp.load(tiny_bert(seed=3)), pairs(n=16, seed=4)
    st = {**stage, "sparsity": 0.9, "ignore": ["pooler.dense"], "schedule": {"start": 0.1, "end": 0.8, "every": 1},
          "losses": [{"type": "pair-cosine"}], "train": {"steps": 10, "batch_size": 4, "lr": 1e-3}}
    report = mp.compress(lm, {"stages": [st]}, train=data, progress=False)
    layers = {n: m for n, m in lm.module.named_modules() if isinstance(m, SparseLayer)}
    assert len(layers) == 12 and all(n.startswith("encoder.layer.") for n in layers)
    for m in layers.values():
        zeros = int((m.effective_weight() == 0).sum())
        assert abs(zeros - 0.9 * m.weight.numel()) <= 1, zeros
    metrics = next(x for s in report["stages"] for x in s.get("metrics", []))
    assert metrics["steps"] == 10 and all(torch.isfinite(torch.tensor(v)) for _, v in metrics["losses"])
