"""deepsail.eval.metrics against numbers worked out by hand, sacrebleu's own scores, and a direct forward pass."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from deepsail.data.tokenizer import token_byte_lengths
from deepsail.eval.metrics import (
    accuracy_f1,
    bits_per_byte,
    bleu,
    chrf,
    map_at_r,
    perplexity,
    recall_at_k,
    same_label,
)
from deepsail.infer.generate import load
from deepsail.train.pretrain import evaluate

# --- retrieval -------------------------------------------------------------------------------------------------------
# 4 queries x 5 gallery items. Each query's gallery order, most similar first, and its relevant items:
#   q0: 0 2 3 4 1   relevant {3, 4}     ranks 3, 4 relevant: R=2, top 2 hold none      -> AP@R 0;   first hit at 3
#   q1: 4 1 3 0 2   relevant {4}        rank 1 relevant:     R=1                       -> AP@R 1;   first hit at 1
#   q2: 0 1 2 3 4   relevant {1, 3, 4}  ranks 2, 4, 5:       R=3, top 3 hold rank 2    -> (1/2) / 3 = 1/6; hit at 2
#   q3: 4 3 2 1 0   relevant {}         nothing to retrieve: left out of every mean
# R@1 = 1/3 (q1), R@2 = 2/3 (q1, q2), R@3 = 1, R@10 (past the gallery) = 1; mAP@R = (0 + 1 + 1/6) / 3 = 7/18.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2],
        [0.2, 0.7, 0.1, 0.6, 0.9],
        [0.5, 0.4, 0.3, 0.2, 0.1],
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ]
)
RELEVANT = [[3, 4], [4], [1, 3, 4], []]


def test_recall_and_map_at_r_by_hand():
    assert recall_at_k(SIM, RELEVANT, ks=(1, 2, 3, 10)) == pytest.approx(
        {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1, "R@10": 1}
    )
    assert map_at_r(SIM, RELEVANT) == pytest.approx(7 / 18)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for q, ids in enumerate(RELEVANT):
        mask[q, ids] = True
    assert map_at_r(SIM, mask) == pytest.approx(7 / 18)  # a mask and id lists are the same relevance
    # class labels for both sides: each query finds its class first, so every score is perfect
    labels = same_label([0, 1, 2], [2, 0, 1, 0])
    sim = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.1, 0.2, 0.9, 0.3], [0.9, 0.1, 0.2, 0.3]])
    assert map_at_r(sim, labels) == 1.0 and recall_at_k(sim, labels, ks=(1,)) == {"R@1": 1.0}
    # the second same-class item ranked third instead of second: AP@R of query 0 = (1 + 0) / 2
    sim[0, 3] = 0.15
    assert map_at_r(sim, labels) == pytest.approx((0.5 + 1 + 1) / 3)


def test_retrieval_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(SIM, RELEVANT, ks=(0, 5))
    with pytest.raises(ValueError, match="relevant"):
        map_at_r(SIM, torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="relevant"):
        map_at_r(SIM, [[1]] * 3)
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(SIM, [[], [], [], []])
    with pytest.raises(ValueError, match="sim"):
        map_at_r(torch.zeros(5), RELEVANT)


# --- classification --------------------------------------------------------------------------------------------------
def test_accuracy_and_macro_f1_by_hand():
    pred, gold = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    # per class F1 = 2tp / (2tp + fp + fn): class 0: 2/4, class 1: 2/3, class 2: 4/5; class 3 absent -> not averaged
    want = {"accuracy": 4 / 6, "macro_f1": (1 / 2 + 2 / 3 + 4 / 5) / 3}
    assert accuracy_f1(pred, gold, n_classes=4) == pytest.approx(want)
    try:
        from sklearn.metrics import f1_score

        assert want["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    except ImportError:
        pass
    assert accuracy_f1(torch.tensor(gold), torch.tensor(gold), 3) == {"accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError, match="pred and gold"):
        accuracy_f1(pred, gold[:-1], 4)
    with pytest.raises(ValueError, match="gold"):
        accuracy_f1([], [], 4)
    with pytest.raises(ValueError, match="pred"):
        accuracy_f1([0, 5], [0, 1], 4)


# --- generation ------------------------------------------------------------------------------------------------------
HYPS = ["the cat sat on the mat", "a quick brown fox jumps over a lazy dog"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over the lazy dog"]


def test_bleu_and_chrf_are_sacrebleus():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert chrf(HYPS, REFS, word_order=2) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score)
    assert 0 < bleu(HYPS, REFS) < 99 and bleu(REFS, REFS) == pytest.approx(100) == chrf(REFS, REFS)
    # several references per hypothesis, a different number each: sacrebleu's streams, padded with None
    multi = [[REFS[0], "a cat sat on the mat"], [REFS[1]]]
    want = sacrebleu.corpus_bleu(HYPS, [[REFS[0], REFS[1]], ["a cat sat on the mat", None]]).score
    assert bleu(HYPS, multi) == pytest.approx(want) and bleu(HYPS, multi) > bleu(HYPS, REFS)
    with pytest.raises(ValueError, match="hyps and refs"):
        bleu(HYPS, REFS[:1])
    with pytest.raises(ValueError, match="hyps"):
        chrf([], [])


def test_missing_sacrebleu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu now raises ImportError
    with pytest.raises(ImportError, match=r"deepsail\[eval\]"):
        bleu(HYPS, REFS)


# --- language modelling ----------------------------------------------------------------------------------------------
TEXTS = ["def add(a, b):\n    return a + b\n", "naïve café — ünïcode <|end|> bytes: 日本語\n" * 3]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir, device="cpu", dtype="fp32")


def _ids(tok, text: str) -> list[int]:
    # what a document follows in deepsail's shards: EOS (its tokenizer adds no BOS); special-token text stays text
    return [tok.eos_id] + tok.encode(text, split_special_tokens=True)


def test_perplexity_is_exp_mean_nll_of_a_direct_forward_pass(tiny):
    model, tok = tiny
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([_ids(tok, text)])
            nll += F.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    got = perplexity(model, tok, TEXTS, window=256, batch_size=2)
    assert got["tokens"] == n and got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # bits per byte: every nat of the text over ln 2, over its UTF-8 length (the non-ASCII counted in bytes)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert got["bytes"] == n_bytes > sum(map(len, TEXTS))
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(bits_per_byte(nll, n_bytes), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_the_promised_context(tiny):
    model, tok = tiny
    text = TEXTS[1][: len(TEXTS[1]) // 3]
    ids = torch.tensor(_ids(tok, text))
    window, n = 8, len(ids)
    # stride 1: target j is predicted from the `window` tokens before it, or all of them near the start; the first
    # `window` targets from one causal pass over the first `window` tokens, each later one from its own row
    with torch.no_grad():
        head = model(ids[None, :window]).logits[0]
        rows = torch.stack([ids[j - window : j] for j in range(window + 1, n)])
        tail = model(rows).logits[:, -1]
    nll = F.cross_entropy(torch.cat([head, tail]), ids[1:], reduction="sum").item()
    got = perplexity(model, tok, [text], window=window, stride=1, batch_size=16)
    assert got["tokens"] == n - 1 and got["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    disjoint = perplexity(model, tok, [text], window=window)
    overlapping = perplexity(model, tok, [text], window=window, stride=3)
    assert disjoint["tokens"] == overlapping["tokens"] == n - 1 and disjoint["loss"] != overlapping["loss"]


def test_bits_per_byte_is_the_one_training_reports(tiny):
    model, tok = tiny
    ids = torch.tensor([_ids(tok, TEXTS[1])])
    trained = evaluate(model, [(ids[:, :-1], ids[:, 1:])], token_byte_lengths(tok), torch.device("cpu"), "fp32")
    got = perplexity(model, tok, [TEXTS[1]], window=512)
    assert got["bits_per_byte"] == pytest.approx(trained["bpb"], rel=1e-9) and got["bytes"] == trained["bytes"]
    assert got["loss"] == pytest.approx(trained["loss"], rel=1e-9)


def test_perplexity_bad_input_names_the_argument(tiny):
    model, tok = tiny
    for kwargs, name in (
        (dict(texts=[]), "texts"),
        (dict(texts="one string"), "texts"),
        (dict(texts=[""]), "texts"),
        (dict(texts=TEXTS, window=0), "window"),
        (dict(texts=TEXTS, window=10_000), "window"),
        (dict(texts=TEXTS, window=8, stride=9), "stride"),
        (dict(texts=TEXTS, batch_size=0), "batch_size"),
    ):
        with pytest.raises(ValueError, match=name):
            perplexity(model, tok, **kwargs)
