"""Segment memory on long documents: val bits/byte of the longest held-out files read in segments, with and without
the Transformer-XL memory, at the same segment length (issue 12).

    python benchmarks/segment_memory.py runs/ablations/memory runs/ablations/baseline \
        --tokenizer runs/ablations-data/tokenizer

Each file of the embedded corpus's validation split (the --files longest) is tokenized and read in --segment-token
segments; "alone" scores each segment with no context before it, "memory" lets each attend to the previous
segments' last --memory keys/values (deepsail.model.memory.SegmentMemory). Every token is scored once either way,
so the two bpb are over the same bytes. A model trained with `--arch segment_memory=M` learned to use the memory;
one trained without sees it only at inference.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def document_bpb(model, ids, token_bytes, segment: int, memory_len: int) -> tuple[float, int]:
    """(nats over the document's scored tokens, their bytes) reading `ids` in segments."""
    import torch

    from deepsail.model.memory import SegmentMemory

    memory = SegmentMemory(memory_len) if memory_len else None
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, segment):
            x = ids[start : start + segment][None]
            y = ids[start + 1 : start + segment + 1][None]
            x = x[:, : y.shape[1]]
            out = memory.forward(model, x) if memory else model(x)
            logp = out.logits.float().log_softmax(-1).gather(-1, y[..., None])[..., 0]
            nats -= float(logp.sum())
            n_bytes += int(token_bytes[y].sum())
    return nats, n_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--memory", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8192, help="per file (the longest files are long)")
    a = p.parse_args()

    import torch

    from deepsail.data.corpus import default_corpus
    from deepsail.data.tokenizer import Tokenizer, token_byte_lengths
    from deepsail.model import from_pretrained
    from deepsail.train.checkpoint import resolve_checkpoint

    tok = Tokenizer.load(a.tokenizer)
    token_bytes = token_byte_lengths(tok)
    docs = sorted(default_corpus("val"), key=lambda d: len(d.text), reverse=True)[: a.files]
    ids = [torch.tensor(tok.encode(d.text)[: a.max_tokens]) for d in docs]
    print(
        f"load {os.getloadavg()[0]:.1f} | {a.files} longest val files ({', '.join(d.source for d in docs)}), "
        f"{sum(map(len, ids)):,} tokens | segments of {a.segment}, memory {a.memory}"
    )
    print("\n| model | trained with memory | bpb alone | bpb with memory | change |\n|---|---|---|---|---|")
    for run in a.runs:
        model = from_pretrained(resolve_checkpoint(run), dtype="fp32").eval()
        scores = {}
        for mode, m in (("alone", 0), ("memory", a.memory)):
            parts = [document_bpb(model, d, token_bytes, a.segment, m) for d in ids]
            scores[mode] = sum(n for n, _ in parts) / math.log(2) / sum(b for _, b in parts)
        trained = model.config.segment_memory or "no"
        print(
            f"| {run} | {trained} | {scores['alone']:.4f} | {scores['memory']:.4f} | "
            f"{scores['memory'] - scores['alone']:+.4f} |"
        )


if __name__ == "__main__":
    main()
