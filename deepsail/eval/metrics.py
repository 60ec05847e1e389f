"""Built-in metrics: the ones that need no harness, in one place every verb reuses.

    evaluate_lm(model, batches, token_bytes, device, precision)   loss, perplexity, bits/byte of (x, y) batches
    perplexity(model, tokenizer, texts, window=1024, stride=512)  the same of any texts, in sliding windows
    bits_per_byte(nats, n_bytes)                                  the one bits-per-byte formula
    accuracy_f1(pred, gold, n_classes)                            accuracy and macro-F1 (classifier heads)
    bleu(hyps, refs), chrf(hyps, refs)                            sacrebleu's corpus scores (pip install deepsail[eval])
    recall_at_k(sim, relevant), map_at_r(sim, relevant)           retrieval from a [queries, gallery] similarity

Pretraining and fine-tuning validate with `evaluate_lm` (`deepsail.train.pretrain.evaluate` is it), the unigram
baseline of `deepsail run` and `perplexity` share `bits_per_byte`, and the classifier head scores with
`accuracy_f1`: a number in a report means the same thing whichever verb printed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deepsail.model import IGNORE_INDEX

# --- language modelling --------------------------------------------------------------------------------------------


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """The code length of a text under a model, in bits, per UTF-8 byte of the text: nats / ln 2 / bytes.

    Unlike perplexity it does not depend on the tokenizer (a coarser vocabulary makes fewer, harder predictions for
    the same text), so it compares models with different tokenizers, and a model against a unigram baseline.
    nan when there are no bytes to divide by.
    """
    return nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor | None,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of next-token prediction over (inputs, targets) batches.

    Bits per byte is exactly
        bpb = sum_t nll_t / ln 2  /  sum_t bytes(y_t)
    over every target token y_t with bytes(y_t) > 0, where `token_bytes[id]` is the length of the byte string token
    `id` stands for. With a byte-level BPE every token is a fixed byte string, so the byte counts of consecutive
    tokens add up to exactly the UTF-8 length of the text they spell (decoding single tokens with `.decode` would
    not: a token ending mid-character decodes to U+FFFD). Special tokens (document separators) are 0 bytes; their
    loss is left out of the numerator too, so bpb measures the text alone, as in nanochat. Loss and perplexity count
    every target token (IGNORE_INDEX targets are skipped). `token_bytes` None (a tokenizer that is not byte-level)
    gives bpb = nan.
    """
    # Lazily: deepsail.train's __init__ imports this module back (through pretrain), so a top-level import would
    # find this module half-initialised when it is the first one imported.
    from deepsail.train.amp import autocast

    was_training = model.training
    model.eval()
    if token_bytes is None:
        token_bytes = torch.zeros(model.config.vocab_size, dtype=torch.int64)
    token_bytes = token_bytes.to(device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    nll_text = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x_BT, y_BT in batches:
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast(device, precision):
            logits_BTV = model(x_BT).logits
        # Row by row, so the fp32 copy of the logits is T x V, not B x T x V (8 GB at B=8, T=2k, V=129k).
        nll_BT = torch.stack(
            [
                F.cross_entropy(logits_BTV[b].float(), y_BT[b], ignore_index=IGNORE_INDEX, reduction="none")
                for b in range(len(y_BT))
            ]
        )
        valid_BT = y_BT != IGNORE_INDEX
        bytes_BT = torch.where(valid_BT, token_bytes[y_BT.clamp(min=0)], 0)
        nll_sum += nll_BT[valid_BT].sum(dtype=torch.float64)
        nll_text += nll_BT[bytes_BT > 0].sum(dtype=torch.float64)
        n_tokens += valid_BT.sum()
        n_bytes += bytes_BT.sum()
    model.train(was_training)
    if n_tokens.item() == 0:
        raise ValueError(
            "evaluation saw no tokens: the batches held no targets (for a training run: the val split is empty; "
            "re-prepare the data with a val split)."
        )
    loss = (nll_sum / n_tokens).item()
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": bits_per_byte(nll_text.item(), int(n_bytes.item())),
        "tokens": int(n_tokens.item()),
        "bytes": int(n_bytes.item()),
    }


def _windows(ids: list[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over one text's ids: each reads up to `window` tokens and scores only targets no
    earlier window scored, so every token but the first counts once. With stride < window, a window's
    first `window - stride` targets are context already scored, and each new target sees at least that much."""
    out = []
    begin, scored = 0, 1  # targets ids[1:scored] are done (ids[0] is never a target)
    while scored < len(ids):
        end = min(begin + window, len(ids) - 1)  # inputs ids[begin:end] predict ids[begin + 1:end + 1]
        targets = ids[begin + 1 : end + 1]
        keep_from = scored - (begin + 1)
        out.append((ids[begin:end], [IGNORE_INDEX] * keep_from + targets[keep_from:]))
        scored = end + 1
        begin += stride
    return out


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `model` on `texts`: {loss, ppl, bits_per_byte, tokens,
    bytes}.

    Each text is tokenized on its own (special-token text such as "<|end|>" stays plain characters) after the token
    a document starts after in training (BOS for tokenizers that add one, else EOS, the separator of deepsail's
    shards), so its first token is predicted too; a tokenizer with neither leaves the first token as context only.
    The ids are cut into windows of `window` tokens (default 1024, or the model's context if shorter); a `stride`
    below `window` (default: equal, disjoint windows) overlaps them, and only each window's new targets are scored,
    after at least `window - stride` tokens of context: a smaller stride gives a lower, more faithful perplexity at
    window/stride times the compute. Windows run `batch_size` at a time, without gradients, in autocast `precision`
    ("fp32": as the model is loaded). Bits per byte is `evaluate_lm`'s, so it equals the number training reports on
    the same tokens; for a tokenizer that is not byte-level the denominator is the UTF-8 length of the scored text.
    """
    from deepsail.data.tokenizer import token_byte_lengths

    if isinstance(texts, str) or not len(texts) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: pass a non-empty list of strings (one string is a list of one: [text]).")
    max_len = model.config.max_position_embeddings
    # 1024 tokens of context by default: past that, a longer window changes perplexity little and costs more
    window = min(1024, max_len) if window is None else window
    stride = window if stride is None else stride
    if not 1 <= window <= max_len:
        raise ValueError(f"window {window}: must be between 1 and the model's max_position_embeddings {max_len}.")
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride}: must be between 1 and window ({window}).")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1.")
    # The first token is predicted from what a document starts after in training: BOS where the tokenizer says every
    # text gets one (DeepSeek's), else EOS (deepsail's shards separate documents with EOS alone, see encode_prompt).
    bos = tokenizer.bos_id if getattr(tokenizer, "config", {}).get("add_bos_token") else None
    start = bos if bos is not None else tokenizer.eos_id
    encoded = [
        ([start] if start is not None else []) + ids
        for ids in tokenizer.encode_batch(list(texts), split_special_tokens=True)
    ]
    windows = [w for ids in encoded for w in _windows(ids, window, stride)]
    if not windows:
        raise ValueError(f"texts: {len(texts)} text(s) hold no token to predict; pass some non-empty text.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        # Right padding: a causal model's real positions never see the pad after them, and pad targets are ignored.
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            width = max(len(x) for x, _ in chunk)
            x_BT = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk], device=device)
            y_BT = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in chunk], device=device)
            yield x_BT, y_BT

    token_bytes = token_byte_lengths(tokenizer)
    result = evaluate_lm(model, batches(), token_bytes, device, precision)
    if token_bytes is None:  # not byte-level: count the scored text's bytes directly
        skipped = 0 if start is not None else sum(len(tokenizer.decode(ids[:1]).encode("utf-8")) for ids in encoded)
        result["bytes"] = sum(len(t.encode("utf-8")) for t in texts) - skipped
        result["bpb"] = bits_per_byte(result["loss"] * result["tokens"], result["bytes"])
    result["bits_per_byte"] = result.pop("bpb")
    return result


# --- classification ------------------------------------------------------------------------------------------------


def accuracy_f1(
    pred: Sequence[int] | torch.Tensor, gold: Sequence[int] | torch.Tensor, n_classes: int
) -> dict[str, float]:
    """Accuracy and macro-F1 of class ids: {accuracy, macro_f1}.

    Macro-F1 is the unweighted mean of per-class F1 = 2 tp / (2 tp + fp + fn) over the classes that occur in `gold`
    or `pred` (a class neither present nor predicted has no F1), which is scikit-learn's f1_score(average="macro").
    """
    p, g = torch.as_tensor(pred).long().flatten(), torch.as_tensor(gold).long().flatten()
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} predictions for {len(g)} gold labels.")
    if not len(g):
        raise ValueError("gold is empty: there is nothing to score.")
    if n_classes < 1:
        raise ValueError(f"n_classes {n_classes}: must be at least 1.")
    for name, t in (("pred", p), ("gold", g)):
        if t.min() < 0 or t.max() >= n_classes:
            raise ValueError(f"{name} holds class ids outside 0..{n_classes - 1} (n_classes {n_classes}).")
    # confusion[i, j]: gold i predicted as j; tp on the diagonal, fp down a column, fn along a row
    confusion = torch.bincount(g * n_classes + p, minlength=n_classes * n_classes).view(n_classes, n_classes)
    tp = confusion.diag()
    support = 2 * tp + (confusion.sum(0) - tp) + (confusion.sum(1) - tp)
    seen = support > 0
    f1 = (2 * tp[seen]).double() / support[seen]
    return {"accuracy": float((p == g).double().mean()), "macro_f1": float(f1.mean())}


# --- generation: sacrebleu's corpus scores -------------------------------------------------------------------------


def _sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError("BLEU and chrF use sacrebleu: pip install 'deepsail[eval]' (or sacrebleu>=2.4).") from e
    return sacrebleu


def _reference_streams(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference slot; callers think one list of references per hypothesis."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise ValueError("hyps and refs: pass lists (one string is a list of one: [text]).")
    if not len(hyps):
        raise ValueError("hyps is empty: there is nothing to score.")
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs differ in length: {len(hyps)} hypotheses, {len(refs)} references.")
    per_hyp = [[r] if isinstance(r, str) else list(r) for r in refs]
    if any(not r for r in per_hyp):
        raise ValueError("refs: every hypothesis needs at least one reference.")
    slots = max(map(len, per_hyp))
    # a hypothesis with fewer references leaves its later slots None, which sacrebleu skips
    return [[r[k] if k < len(r) else None for r in per_hyp] for k in range(slots)]


def bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of hypotheses against references (one string, or a list of strings, per hypothesis), as
    `sacrebleu` computes it by default (13a tokenization, exponential smoothing): the number papers report."""
    return float(_sacrebleu().corpus_bleu(list(hyps), _reference_streams(hyps, refs)).score)


def chrf(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], word_order: int = 0) -> float:
    """Corpus chrF (0-100): character n-gram F-score, sacrebleu's defaults; `word_order=2` is chrF++."""
    streams = _reference_streams(hyps, refs)
    return float(_sacrebleu().corpus_chrf(list(hyps), streams, word_order=word_order).score)


# --- retrieval -------------------------------------------------------------------------------------------------------


def same_label(
    query_labels: Sequence[int] | torch.Tensor, gallery_labels: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """[queries, gallery] bool: gallery item j is relevant to query i when they share a class label."""
    q, g = torch.as_tensor(query_labels).flatten(), torch.as_tensor(gallery_labels).flatten()
    return q[:, None] == g[None, :]


def _ranked_relevance(sim: torch.Tensor, relevant: torch.Tensor | Sequence[Iterable[int]]) -> torch.Tensor:
    """[queries, gallery] bool: row i is query i's relevance in rank order (most similar first; ties by gallery
    index), for the queries with at least one relevant item (the others have no recall or precision to measure)."""
    sim = torch.as_tensor(sim)
    if sim.dim() != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a [queries, gallery] matrix, got shape {tuple(sim.shape)}.")
    n_q, n_g = sim.shape
    if isinstance(relevant, torch.Tensor):
        mask = relevant.to(device=sim.device, dtype=torch.bool)
        if mask.shape != sim.shape:
            raise ValueError(f"relevant has shape {tuple(mask.shape)}, sim {tuple(sim.shape)}: they must match.")
    else:
        if len(relevant) != n_q:
            raise ValueError(f"relevant lists {len(relevant)} queries' gallery ids, sim has {n_q} queries.")
        rows = [(i, j) for i, ids in enumerate(relevant) for j in ids]
        if any(not 0 <= j < n_g for _, j in rows):
            raise ValueError(f"relevant holds gallery ids outside 0..{n_g - 1}.")
        mask = torch.zeros(n_q, n_g, dtype=torch.bool, device=sim.device)
        if rows:
            mask[tuple(torch.tensor(rows, device=sim.device).T)] = True
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    ranked = mask.gather(1, order)
    ranked = ranked[ranked.any(1)]
    if not len(ranked):
        raise ValueError("relevant: no query has a relevant gallery item, so there is nothing to retrieve.")
    return ranked


def recall_at_k(
    sim: torch.Tensor, relevant: torch.Tensor | Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K as metric learning reports it: the share of queries with at least one relevant item among their K
    most similar gallery items ({"R@1": ..., "R@5": ...}).

    `sim` is [queries, gallery] (higher = more similar); `relevant` a [queries, gallery] bool mask (`same_label`
    makes one from class labels) or each query's relevant gallery ids. Queries with nothing relevant are left out.
    A K beyond the gallery size counts the whole gallery. To retrieve a set from itself, set sim's diagonal to -inf
    and relevant's to False, so an item never finds itself.
    """
    if isinstance(ks, int) or not len(ks) or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks {ks!r}: pass a list of whole numbers >= 1, e.g. (1, 5, 10).")
    ranked = _ranked_relevance(sim, relevant)
    hit_by = ranked.cummax(1).values  # hit_by[i, r]: a relevant item at rank <= r
    return {f"R@{int(k)}": float(hit_by[:, min(int(k), ranked.shape[1]) - 1].double().mean()) for k in ks}


def map_at_r(sim: torch.Tensor, relevant: torch.Tensor | Sequence[Iterable[int]]) -> float:
    """Mean average precision at R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", 2020).

    For a query with R relevant gallery items, look at its top R: AP@R = (1/R) sum_{i<=R} P(i) rel(i), where P(i) is
    the precision among the top i and rel(i) whether rank i is relevant. Unlike R@K it rewards ranking *all* the
    relevant items first, and unlike plain mAP it is 1 only when they fill the top R. Arguments as `recall_at_k`.
    """
    ranked = _ranked_relevance(sim, relevant)
    n_g = ranked.shape[1]
    r = ranked.sum(1, keepdim=True)  # [Q, 1]
    hits = ranked.cumsum(1)  # hits[i, j]: relevant items among the top j + 1
    rank = torch.arange(1, n_g + 1, device=ranked.device)
    in_top_r = rank[None, :] <= r
    precision_at_hits = torch.where(ranked & in_top_r, hits.double() / rank, 0.0)
    return float((precision_at_hits.sum(1) / r.squeeze(1)).mean())
