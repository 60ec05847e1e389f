"""Task heads: a sequence classifier on a deepsail trunk, its evaluation (accuracy and macro-F1, from
`deepsail.eval.metrics`), and the bag-of-words baseline it must beat.

The "light task layer" of the design: the trunk (base model, or base + domain adapter) reads the text; the
representation of its last real token (a causal model has read everything by then) goes through the trunk's final
norm and one linear `score` layer (HF's `*ForSequenceClassification` layout: `score.weight` [labels, hidden]).

A classifier run folder holds the trunk (HF folder or adapter) plus `classifier.json` (labels, pooling) and
`score.safetensors`. The baseline is multinomial logistic regression on bag-of-token counts (log 1 + tf), trained
full-batch in the same run on the same split: if the fine-tuned model cannot beat it, the model learned nothing a
word count doesn't know.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from deepsail.eval.metrics import accuracy_f1

CLASSIFIER_CONFIG = "classifier.json"
SCORE_WEIGHTS = "score.safetensors"


class SequenceClassifier(nn.Module):
    """logits [B, labels] = score(norm(hidden at each row's last real token))."""

    def __init__(self, trunk: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {list(labels)}.")
        self.trunk, self.labels = trunk, list(labels)
        device = trunk.embed_tokens.weight.device
        self.score = nn.Linear(trunk.config.hidden_size, len(labels), bias=False, device=device)
        nn.init.normal_(self.score.weight, std=trunk.config.initializer_range)
        self.config = trunk.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # last_logits_only keeps the LM head to one row per sequence; the hidden states are what we pool.
        out = self.trunk(input_ids, input_lens=lengths, last_logits_only=True, return_hidden=True)
        pooled = out.hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1]
        return self.score(self.trunk.norm(pooled).to(self.score.weight.dtype))

    def save_head(self, path: str | Path) -> None:
        """classifier.json + score.safetensors into `path` (a folder being written; not atomic by itself)."""
        path = Path(path)
        (path / CLASSIFIER_CONFIG).write_text(json.dumps({"labels": self.labels, "pooling": "last"}, indent=2) + "\n")
        save_file({"score.weight": self.score.weight.detach().float().contiguous()}, str(path / SCORE_WEIGHTS))


def load_head(trunk: nn.Module, path: str | Path) -> SequenceClassifier:
    path = Path(path)
    try:
        config = json.loads((path / CLASSIFIER_CONFIG).read_text())
        weight = load_file(str(path / SCORE_WEIGHTS))["score.weight"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{path} holds no readable classifier head ({CLASSIFIER_CONFIG} + {SCORE_WEIGHTS}): {e}"
        ) from e
    model = SequenceClassifier(trunk, config["labels"])
    if weight.shape != model.score.weight.shape:
        raise ValueError(
            f"{path}: score.weight is {tuple(weight.shape)}, the trunk needs {tuple(model.score.weight.shape)}."
        )
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model


def classify_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    x, lengths, y = batch
    return {"loss": F.cross_entropy(model(x, lengths).float(), y)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    was = model.training
    model.eval()
    predicted, actual, loss_sum = [], [], 0.0
    for x, lengths, y in batches:
        logits = model(x, lengths).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted += logits.argmax(-1).tolist()
        actual += y.tolist()
    model.train(was)
    return {"loss": loss_sum / len(actual), **accuracy_f1(predicted, actual, len(model.labels))}


def bag_of_words_baseline(
    train: tuple[Sequence[Sequence[int]], Sequence[int]],
    val: tuple[Sequence[Sequence[int]], Sequence[int]],
    vocab_size: int,
    n_classes: int,
    steps: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Logistic regression on log(1 + token counts), full-batch AdamW with a little weight decay; val metrics."""

    def features(docs: Sequence[Sequence[int]]) -> torch.Tensor:
        counts = torch.zeros(len(docs), vocab_size)
        for row, ids in enumerate(docs):
            counts[row].index_add_(0, torch.as_tensor(list(ids)), torch.ones(len(ids)))
        return counts.log1p()

    x_train, y_train = features(train[0]), torch.as_tensor(list(train[1]))
    x_val, y_val = features(val[0]), torch.as_tensor(list(val[1]))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab_size, n_classes, generator=g) / math.sqrt(vocab_size)).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=0.05, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(x_train @ w + b, y_train).backward()
        opt.step()
    with torch.no_grad():
        logits = x_val @ w + b
        loss = F.cross_entropy(logits, y_val).item()
    return {"loss": loss, **accuracy_f1(logits.argmax(-1), y_val, n_classes)}
