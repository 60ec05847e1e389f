"""Fine-tuning data: records in, length-bucketed padded batches out.

Three kinds of example, one batcher:
- chats (`deepsail sft`): OpenAI-style `{"messages": [...]}` rendered with the model's chat template; the target is
  the next token where that token is the assistant's (`Tokenizer.encode_chat`'s mask), -100 elsewhere;
- labelled texts (`deepsail finetune --task classify`): `{"text": ..., "label": ...}`, one class id per record;
- plain texts (`deepsail finetune` on a .jsonl/.txt/.parquet): tokenized into shards by `deepsail.data.prepare` and
  packed like pretraining (that path does not come through here).

Conversations are padded per length bucket, not packed: each batch holds conversations of similar length, padded
to its longest (`BucketBatcher`), so no conversation can attend to another and attention keeps SDPA's causal
kernel. Packing would need a block-diagonal mask: SDPA with that mask ran 1.16-1.22x slower than is_causal at
T=256-512 (CPU, forward, 8x8 heads of 64), and it still computes every cross-document score it then masks. Bucketed
padding costs less: 0.1% of batch slots on the embedded docstring chats (the share is printed every run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepsail.data.loader import BucketBatcher, length_buckets
from deepsail.model import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file; a line that is not a JSON object is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file (expected a .jsonl file, one JSON object per line).")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}).") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}.")
            record.setdefault("source", f"{path}:{n}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


@dataclass
class Examples:
    """Tokenized examples: inputs, and per-token targets (chats) or one class id per example (classify)."""

    inputs: list[list[int]]
    targets: list[list[int]] | list[int]
    per_token: bool
    dropped: int = 0  # examples left out (longer than the limit with no target left, say)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.inputs)


def _check_chat(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty `messages` list (OpenAI chat format).")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f'{where}: message {i} must be {{"role": one of {list(ROLES)}, "content": a string}}, got {m!r:.80}.'
            )
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to train on.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_examples(records: Sequence[dict[str, Any]], tokenizer: Any, max_len: int) -> Examples:
    """Chats -> (input ids, next-token targets on assistant tokens only). Longer chats are cut to `max_len` inputs;
    one left with no assistant target is dropped (and counted)."""
    inputs, targets, dropped, truncated = [], [], 0, 0
    for i, record in enumerate(records):
        where = f"record {i} ({record.get('source', '?')})"
        messages = _check_chat(record, where)
        try:
            ids, mask = tokenizer.encode_chat(messages)
        except Exception as e:
            raise ValueError(f"{where}: the chat template could not render it ({e}).") from e
        if len(ids) - 1 > max_len:
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            truncated += 1
        x = ids[:-1]
        y = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        if not x or all(t == IGNORE_INDEX for t in y):
            dropped += 1
            continue
        inputs.append(x)
        targets.append(y)
    if not inputs:
        raise ValueError(f"none of the {len(records)} chats keeps an assistant token within {max_len} tokens.")
    return Examples(inputs, targets, per_token=True, dropped=dropped, truncated=truncated)


def class_examples(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_len: int,
    labels: Sequence[str],
    text_field: str = "text",
    labels_field: str = "label",
) -> Examples:
    """Labelled texts -> (ids, class index). Texts longer than `max_len` tokens keep their first `max_len`."""
    index = {label: i for i, label in enumerate(labels)}
    inputs, targets, truncated = [], [], 0
    for i, record in enumerate(records):
        where = f"record {i} ({record.get('source', '?')})"
        text, label = record.get(text_field), record.get(labels_field)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: expected a non-empty string in {text_field!r} (--text-field).")
        if label is None:
            raise ValueError(f"{where}: has no {labels_field!r} field (--labels-field).")
        if str(label) not in index:
            raise ValueError(f"{where}: label {label!r} is not one of --labels {list(labels)}.")
        ids = tokenizer.encode(text)
        if len(ids) > max_len:
            ids, truncated = ids[:max_len], truncated + 1
        if not ids:
            raise ValueError(f"{where}: the text encodes to no tokens.")
        inputs.append(ids)
        targets.append(index[str(label)])
    return Examples(inputs, targets, per_token=False, truncated=truncated)


class ExampleBatches:
    """Endless, resumable batches of `Examples` on `device` (BucketBatcher underneath: each batch pads to its
    longest example and holds at most `max_tokens` padded tokens).

    Per-token examples give (x [B, L], y [B, L]) with -100 on padding; classify examples give
    (x [B, L], lengths [B], y [B])."""

    def __init__(self, examples: Examples, max_tokens: int, pad_id: int, seed: int, device: torch.device) -> None:
        self.examples, self.device, self.pad_id = examples, device, pad_id
        self.batcher = BucketBatcher(examples.inputs, max_tokens, pad_id, seed=seed)
        self.lengths = self.batcher.lengths

    @property
    def batches_per_epoch(self) -> int:
        return self.batcher.batches_per_epoch

    def padded_fraction(self) -> float:
        """Share of an epoch's batch slots that are padding (plan of epoch 0)."""
        plan = length_buckets(self.lengths, self.batcher.max_tokens, self.batcher.seed, 0)
        slots = sum(len(b) * int(self.lengths[b].max()) for b in plan)
        return 1 - float(self.lengths.sum()) / slots

    def collate(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        batch = self.batcher.collate(idx)
        x = batch.input_ids
        if self.examples.per_token:
            y = torch.full_like(x, IGNORE_INDEX)
            for row, i in enumerate(idx.tolist()):
                t = self.examples.targets[i]
                y[row, : len(t)] = torch.tensor(t)
            return x.to(self.device), y.to(self.device)
        y = torch.tensor([self.examples.targets[i] for i in idx.tolist()])
        return x.to(self.device), batch.lengths.to(self.device), y.to(self.device)

    def __iter__(self) -> ExampleBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        return self.collate(self.batcher.next_indices())

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)

    def fixed_order(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every example once, in the same batches every time (for evaluation)."""
        for idx in length_buckets(self.lengths, self.batcher.max_tokens, seed=0, epoch=0):
            yield self.collate(idx)
